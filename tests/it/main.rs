//! Integration tests: the real hub (`prostaff_events::run`) on port 0, a real `redis-server`
//! per test on a free port, a fake Rails inside the test, and real WebSocket clients.
//! One test binary so the crate links once.

mod admin;
mod autobahn;
mod browser;
mod catalogue;
mod cli;
mod cluster;
mod fuzz_regressions;
mod ha;
mod hardening;
mod ingest;
mod inhouse;
mod js;
mod layers;
mod limits;
mod longpoll;
mod presence;
mod recovery;
mod revocation;
mod robustness;
mod sequencer;
mod shutdown;
mod socket;
mod sse;
mod support;

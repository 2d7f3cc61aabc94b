//! The event catalogue: one JSON Schema (draft 2020-12) per known event type, kept in
//! `config/events/` and built into the binary; [`Catalogue::check`] validates an envelope
//! against its type's schema, [`Catalogue::served`] is what `GET /api/events/catalogue`
//! answers, and [`Catalogue::typescript`] generates the committed TypeScript declarations
//! (`config/events/prostaff-events.d.ts`) from the same schemas.
//!
//! A file describes either an envelope type (`x-event-type` is the type, or a prefix ending in
//! `.*`; the schema is checked together with `envelope.json`, the fields every envelope has) or,
//! with `"x-envelope": false`, a push the hub makes itself (`queue_update`, `events_dropped`),
//! which is catalogued for clients and typed but never validated at ingest. `"x-delivered":
//! false` marks a type the hub applies and never pushes (`access.revoked`).
//!
//! Invariant: a [`Violation`] names the type, the JSON pointer and the rule — never a value
//! (payloads can carry personal data).

use std::fmt;

use bytes::Bytes;
use jsonschema::Validator;
use serde_json::{json, Map, Value};

use crate::logsafe::LogSafe;

/// The schema files, built into the binary (a test checks this list against the folder).
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "envelope.json",
        include_str!("../config/events/envelope.json"),
    ),
    (
        "access.revoked.json",
        include_str!("../config/events/access.revoked.json"),
    ),
    (
        "events_dropped.json",
        include_str!("../config/events/events_dropped.json"),
    ),
    (
        "inhouse.check_in_started.json",
        include_str!("../config/events/inhouse.check_in_started.json"),
    ),
    (
        "inhouse.queue_closed.json",
        include_str!("../config/events/inhouse.queue_closed.json"),
    ),
    (
        "inhouse.queue_opened.json",
        include_str!("../config/events/inhouse.queue_opened.json"),
    ),
    (
        "inhouse.session_started.json",
        include_str!("../config/events/inhouse.session_started.json"),
    ),
    (
        "notification.any.json",
        include_str!("../config/events/notification.any.json"),
    ),
    (
        "player.transferred.json",
        include_str!("../config/events/player.transferred.json"),
    ),
    (
        "queue_update.json",
        include_str!("../config/events/queue_update.json"),
    ),
    (
        "roster.player_hired.json",
        include_str!("../config/events/roster.player_hired.json"),
    ),
    (
        "roster.player_removed.json",
        include_str!("../config/events/roster.player_removed.json"),
    ),
    (
        "scrim_request.accepted.json",
        include_str!("../config/events/scrim_request.accepted.json"),
    ),
    (
        "scrim_request.declined.json",
        include_str!("../config/events/scrim_request.declined.json"),
    ),
    (
        "team_goal.at_risk.json",
        include_str!("../config/events/team_goal.at_risk.json"),
    ),
    (
        "team_goal.completed.json",
        include_str!("../config/events/team_goal.completed.json"),
    ),
    (
        "team_goal.missed.json",
        include_str!("../config/events/team_goal.missed.json"),
    ),
    (
        "team_goal.progress_updated.json",
        include_str!("../config/events/team_goal.progress_updated.json"),
    ),
    (
        "tournament_match.confirmed.json",
        include_str!("../config/events/tournament_match.confirmed.json"),
    ),
    (
        "tournament_match.walkover.json",
        include_str!("../config/events/tournament_match.walkover.json"),
    ),
    (
        "tournament_match.any.json",
        include_str!("../config/events/tournament_match.any.json"),
    ),
];

/// The fields every envelope has; each envelope type's schema is checked together with it.
const ENVELOPE_FILE: &str = "envelope.json";

/// The committed TypeScript declarations (a test fails when they drift from the schemas).
pub const TYPESCRIPT_FILE: &str = "config/events/prostaff-events.d.ts";

/// Why an envelope does not match its type's schema. `Display` is safe to log and to answer
/// with: the type, where and which rule — never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The catalogue entry (bounded: usable as a metric label).
    pub event_type: &'static str,
    /// JSON pointer into the envelope.
    pub pointer: String,
    /// The schema keyword that failed (`required`, `type`, `maxLength`, …).
    pub rule: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "schema violation: type={} pointer={} rule={}",
            self.event_type, self.pointer, self.rule
        )
    }
}

/// What the catalogue says of one envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Matches the schema of this catalogue entry.
    Valid(&'static str),
    /// No schema for this type (delivered as before; counted under `unknown`).
    Unknown,
    Invalid(Violation),
}

struct Entry {
    /// The type, or a prefix ending in `.*`.
    key: String,
    title: String,
    /// Pushed to clients (`"x-delivered": false`: applied by the hub, never fanned out).
    delivered: bool,
    /// The file's schema as written.
    schema: Value,
    /// Envelope types (all but `"x-envelope": false`): the schema checked together with
    /// `envelope.json`.
    validator: Option<Validator>,
}

/// The loaded catalogue (built once at start).
pub struct Catalogue {
    envelope: Value,
    entries: Vec<Entry>,
    served: Bytes,
}

/// A catalogue file that cannot be used (a bug in `config/events/`, caught by the tests).
#[derive(Debug, thiserror::Error)]
#[error("event catalogue file {file}: {problem}")]
pub struct CatalogueError {
    file: &'static str,
    problem: String,
}

static BUILTIN: std::sync::OnceLock<Result<Catalogue, CatalogueError>> = std::sync::OnceLock::new();

impl Catalogue {
    /// The built-in catalogue, loaded once per process (its keys are then `'static`, so a
    /// metric label never allocates).
    pub fn builtin() -> Result<&'static Catalogue, &'static CatalogueError> {
        BUILTIN.get_or_init(Catalogue::load).as_ref()
    }

    fn load() -> Result<Catalogue, CatalogueError> {
        let parse = |file: &'static str, text: &str| {
            serde_json::from_str::<Value>(text).map_err(|e| CatalogueError {
                file,
                problem: e.to_string(),
            })
        };
        let (envelope_file, envelope_text) = SCHEMA_FILES
            .iter()
            .find(|(file, _)| *file == ENVELOPE_FILE)
            .ok_or(CatalogueError {
                file: ENVELOPE_FILE,
                problem: "missing".into(),
            })?;
        let envelope = parse(envelope_file, envelope_text)?;
        let mut entries = Vec::new();
        for &(file, text) in SCHEMA_FILES.iter().filter(|(f, _)| *f != ENVELOPE_FILE) {
            let schema = parse(file, text)?;
            let problem = |problem: String| CatalogueError { file, problem };
            let key = schema
                .get("x-event-type")
                .and_then(Value::as_str)
                .ok_or_else(|| problem("no x-event-type".into()))?
                .to_string();
            let title = schema
                .get("title")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric()))
                .ok_or_else(|| problem("title must be an identifier".into()))?
                .to_string();
            let validator = if schema.get("x-envelope") == Some(&Value::Bool(false)) {
                None
            } else {
                let combined = json!({
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "allOf": [envelope, schema],
                });
                let validator =
                    jsonschema::draft202012::new(&combined).map_err(|e| problem(e.to_string()))?;
                Some(validator)
            };
            entries.push(Entry {
                key,
                title,
                delivered: schema.get("x-delivered") != Some(&Value::Bool(false)),
                schema,
                validator,
            });
        }
        let served = serve(&envelope, &entries);
        Ok(Catalogue {
            envelope,
            entries,
            served,
        })
    }

    /// The catalogue key and validator of an envelope type: its exact schema, else the longest
    /// matching prefix.
    fn entry_for(&'static self, event_type: &str) -> Option<(&'static str, &'static Validator)> {
        let envelopes = self
            .entries
            .iter()
            .filter_map(|e| Some((e.key.as_str(), e.validator.as_ref()?)));
        if let Some(exact) = envelopes.clone().find(|(key, _)| *key == event_type) {
            return Some(exact);
        }
        envelopes
            .filter_map(|(key, validator)| {
                let prefix = key.strip_suffix('*')?;
                event_type
                    .starts_with(prefix)
                    .then_some((prefix.len(), (key, validator)))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, entry)| entry)
    }

    /// The metric label of a type: its catalogue entry or `unknown` (bounded cardinality).
    pub fn label(&'static self, event_type: &str) -> &'static str {
        self.entry_for(event_type).map_or("unknown", |(key, _)| key)
    }

    /// Validates a whole envelope (`type` already checked to be a string) against its type.
    pub fn check(&'static self, event_type: &str, envelope: &Value) -> Check {
        let Some((key, validator)) = self.entry_for(event_type) else {
            return Check::Unknown;
        };
        match validator.validate(envelope) {
            Ok(()) => Check::Valid(key),
            Err(error) => {
                let mut pointer = error.instance_path().as_str().to_string();
                if let jsonschema::error::ValidationErrorKind::Required {
                    property: Value::String(name),
                } = error.kind()
                {
                    pointer.push('/');
                    pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
                }
                // Pointers name keys of the envelope (which may come from the publisher): capped
                // and escaped like any untrusted text.
                let pointer: String = pointer.chars().take(128).collect();
                Check::Invalid(Violation {
                    event_type: key,
                    pointer: LogSafe(&pointer).to_string(),
                    rule: error.kind().keyword().to_string(),
                })
            }
        }
    }

    /// `GET /api/events/catalogue`: `{"envelope": schema, "types": {type: schema}}` (the files
    /// as written; nothing else is in them).
    pub fn served(&self) -> Bytes {
        self.served.clone()
    }

    /// The TypeScript declarations of every catalogued type.
    pub fn typescript(&self) -> String {
        let mut out = String::from(
            "// Generated from config/events/*.json by `prostaff-events catalogue typescript`.\n\
             // Do not edit: `cargo test` fails when this file and the schemas disagree.\n\n",
        );
        out.push_str(&ts_interface("Envelope", None, &self.envelope));
        for entry in &self.entries {
            let extends = entry.validator.is_some().then_some("Envelope");
            out.push_str(&ts_interface(&entry.title, extends, &entry.schema));
        }
        let union: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| e.validator.is_some() && e.delivered)
            .map(|e| e.title.as_str())
            .collect();
        out.push_str("/** Every envelope a channel can receive, discriminated on `type`. */\n");
        out.push_str(&format!(
            "export type ProstaffEvent =\n  | {};\n\n",
            union.join("\n  | ")
        ));
        out.push_str("/** Push event name → its payload. */\nexport interface EventMap {\n");
        for entry in self.entries.iter().filter(|e| e.delivered) {
            match entry.key.strip_suffix(".*") {
                Some(prefix) => out.push_str(&format!(
                    "  [event: `{prefix}.${{string}}`]: {};\n",
                    entry.title
                )),
                None => out.push_str(&format!("  {:?}: {};\n", entry.key, entry.title)),
            }
        }
        out.push_str("}\n\n");
        out.push_str(
            "/** A push event name the catalogue knows. */\n\
             export type EventName = keyof EventMap & string;\n\n\
             /** The typed `on` of a phoenix.js `Channel`: `channel as Channel & TypedChannel`. */\n\
             export interface TypedChannel {\n  \
             on<K extends EventName>(event: K, callback: (payload: EventMap[K]) => void): number;\n\
             }\n",
        );
        out
    }
}

fn serve(envelope: &Value, entries: &[Entry]) -> Bytes {
    let types: Map<String, Value> = entries
        .iter()
        .map(|e| (e.key.clone(), e.schema.clone()))
        .collect();
    let body = json!({"envelope": envelope, "types": types});
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

// JSON Schema → TypeScript. Handles the subset the catalogue uses (`type`, `const`, `enum`,
// `properties`/`required`/`additionalProperties`, `items`, `pattern` on a type name) and says
// `unknown` for anything else, so a schema can never produce a type that claims more than the
// schema does.

fn ts_interface(name: &str, extends: Option<&str>, schema: &Value) -> String {
    let mut out = String::new();
    if let Some(description) = schema.get("description").and_then(Value::as_str) {
        out.push_str(&format!("/** {} */\n", comment(description)));
    }
    let extends = extends.map_or(String::new(), |e| format!(" extends {e}"));
    out.push_str(&format!("export interface {name}{extends} {{\n"));
    out.push_str(&ts_members(schema, 1));
    out.push_str("}\n\n");
    out
}

/// The members of an object schema, one per line, at `depth`.
fn ts_members(schema: &Value, depth: usize) -> String {
    let indent = "  ".repeat(depth);
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = String::new();
    let properties = schema.get("properties").and_then(Value::as_object);
    for (name, property) in properties.into_iter().flatten() {
        if let Some(description) = property.get("description").and_then(Value::as_str) {
            out.push_str(&format!("{indent}/** {} */\n", comment(description)));
        }
        let optional = if required.contains(&name.as_str()) {
            ""
        } else {
            "?"
        };
        let key = if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            name.clone()
        } else {
            format!("{name:?}")
        };
        out.push_str(&format!(
            "{indent}{key}{optional}: {};\n",
            ts_type(property, depth)
        ));
    }
    match schema.get("additionalProperties") {
        Some(Value::Bool(false)) => {}
        Some(extra @ Value::Object(_)) => out.push_str(&format!(
            "{indent}[key: string]: {};\n",
            ts_type(extra, depth)
        )),
        _ => out.push_str(&format!("{indent}[key: string]: unknown;\n")),
    }
    out
}

fn ts_type(schema: &Value, depth: usize) -> String {
    if let Some(constant) = schema.get("const") {
        return constant.to_string();
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        let options: Vec<String> = options.iter().map(Value::to_string).collect();
        return options.join(" | ");
    }
    let names: Vec<&str> = match schema.get("type") {
        Some(Value::String(name)) => vec![name.as_str()],
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        _ => return "unknown".into(),
    };
    let types: Vec<String> = names
        .into_iter()
        .map(|name| match name {
            "string" => ts_string_type(schema),
            "integer" | "number" => "number".into(),
            "boolean" => "boolean".into(),
            "null" => "null".into(),
            "array" => match schema.get("items") {
                Some(items) => format!("Array<{}>", ts_type(items, depth)),
                None => "unknown[]".into(),
            },
            "object" => format!(
                "{{\n{}{}}}",
                ts_members(schema, depth + 1),
                "  ".repeat(depth)
            ),
            _ => "unknown".into(),
        })
        .collect();
    types.join(" | ")
}

/// `pattern: "^prefix\\."` becomes a template literal type; any other string is `string`.
fn ts_string_type(schema: &Value) -> String {
    let prefix = schema
        .get("pattern")
        .and_then(Value::as_str)
        .and_then(|p| p.strip_prefix('^'))
        .and_then(|p| p.strip_suffix("\\."))
        .filter(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    match prefix {
        Some(prefix) => format!("`{prefix}.${{string}}`"),
        None => "string".into(),
    }
}

fn comment(text: &str) -> String {
    text.replace("*/", "* /")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> &'static Catalogue {
        Catalogue::builtin().expect("the built-in catalogue loads")
    }

    fn envelope(event_type: &str, payload: Value) -> Value {
        json!({"type": event_type, "org_id": "o1", "user_id": "u1", "payload": payload})
    }

    #[test]
    fn every_file_in_the_folder_is_built_in() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/events");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".json"))
            .collect();
        on_disk.sort();
        let mut built_in: Vec<String> = SCHEMA_FILES.iter().map(|(f, _)| f.to_string()).collect();
        built_in.sort();
        assert_eq!(on_disk, built_in, "add new schema files to SCHEMA_FILES");
        // And each file's name is its key.
        for (file, text) in SCHEMA_FILES.iter().filter(|(f, _)| *f != ENVELOPE_FILE) {
            let schema: Value = serde_json::from_str(text).unwrap();
            let key = schema["x-event-type"]
                .as_str()
                .unwrap()
                .replace(".*", ".any");
            assert_eq!(format!("{key}.json"), *file);
        }
    }

    #[test]
    fn the_types_rails_publishes_are_catalogued() {
        let catalogue = catalogue();
        for event_type in [
            "inhouse.session_started",
            "scrim_request.accepted",
            "scrim_request.declined",
            "tournament_match.confirmed",
            "tournament_match.walkover",
            "team_goal.completed",
            "team_goal.progress_updated",
            "team_goal.at_risk",
            "team_goal.missed",
            "player.transferred",
            "roster.player_removed",
            "roster.player_hired",
            "notification.mention",
            "access.revoked",
        ] {
            assert_ne!(catalogue.label(event_type), "unknown", "{event_type}");
        }
        assert_eq!(catalogue.label("scraper.done"), "unknown");
        assert_eq!(catalogue.label("notification.mention"), "notification.*");
        // A tournament_match type without its own schema still needs its tournament_id.
        assert_eq!(
            catalogue.label("tournament_match.scheduled"),
            "tournament_match.*"
        );
        assert!(matches!(
            catalogue.check(
                "tournament_match.scheduled",
                &envelope("tournament_match.scheduled", json!({}))
            ),
            Check::Invalid(_)
        ));
        // Hub pushes are catalogued but are not envelope types.
        assert_eq!(catalogue.label("queue_update"), "unknown");
    }

    #[test]
    fn violations_name_type_pointer_and_rule_never_the_value() {
        let catalogue = catalogue();
        let missing = envelope(
            "tournament_match.confirmed",
            json!({"match_id": "secret-m"}),
        );
        let Check::Invalid(violation) = catalogue.check("tournament_match.confirmed", &missing)
        else {
            panic!("a confirmed match without tournament_id is invalid");
        };
        assert_eq!(violation.pointer, "/payload/tournament_id");
        assert_eq!(violation.rule, "required");
        let wrong = envelope("tournament_match.confirmed", json!({"tournament_id": true}));
        let Check::Invalid(violation) = catalogue.check("tournament_match.confirmed", &wrong)
        else {
            panic!("a boolean tournament_id is invalid");
        };
        assert_eq!(
            violation.to_string(),
            "schema violation: type=tournament_match.confirmed pointer=/payload/tournament_id rule=type"
        );
        let secret = envelope(
            "access.revoked",
            json!({"identity": "user:1", "scope": "galaxy"}),
        );
        let Check::Invalid(violation) = catalogue.check("access.revoked", &secret) else {
            panic!("an unknown scope is invalid");
        };
        assert!(!violation.to_string().contains("galaxy"), "{violation}");
        assert_eq!(
            catalogue.check(
                "tournament_match.confirmed",
                &envelope("tournament_match.confirmed", json!({"tournament_id": 7}))
            ),
            Check::Valid("tournament_match.confirmed")
        );
        assert_eq!(
            catalogue.check("scraper.done", &envelope("scraper.done", json!(1))),
            Check::Unknown
        );
    }

    #[test]
    fn a_hostile_key_cannot_forge_a_log_line() {
        let catalogue = catalogue();
        let value = json!({"type": "access.revoked", "org_id": "o", "user_id": "u",
            "payload": {"identity": "user:1", "scope": "org", "x\nINFO forged": 1}});
        let Check::Invalid(violation) = catalogue.check("access.revoked", &value) else {
            panic!("additional properties are refused on access.revoked");
        };
        assert!(!violation.to_string().contains('\n'), "{violation}");
    }

    #[test]
    fn the_committed_typescript_matches_the_schemas() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(TYPESCRIPT_FILE);
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = catalogue().typescript();
        assert!(
            committed == generated,
            "{TYPESCRIPT_FILE} is out of date: run \
             `cargo run --release -- catalogue typescript > {TYPESCRIPT_FILE}`"
        );
    }

    #[test]
    fn the_served_catalogue_holds_every_schema() {
        let catalogue = catalogue();
        let served: Value = serde_json::from_slice(&catalogue.served()).unwrap();
        assert_eq!(
            served["types"].as_object().unwrap().len(),
            SCHEMA_FILES.len() - 1
        );
        assert_eq!(served["envelope"]["title"], "Envelope");
        assert_eq!(served["types"]["queue_update"]["x-envelope"], false);
        assert!(served["types"]["notification.*"].is_object());
    }
}

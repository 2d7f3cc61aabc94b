// A typed phoenix.js client: the stock `phoenix` package with the declarations generated from
// the event catalogue (config/events/prostaff-events.d.ts). `cargo test` compiles it with
// `tsc --noEmit`: the `@ts-expect-error` lines prove the payloads are typed (tsc fails when an
// expected error does not happen, e.g. if a payload became `any`).
import { Socket, type Channel } from "phoenix";
import type {
  EventMap,
  ProstaffEvent,
  QueueUpdate,
  TypedChannel,
} from "../../../config/events/prostaff-events";

const socket = new Socket("ws://localhost:4000/socket", { params: { token: "<jwt>" } });
socket.connect();

// Only the tournament's match events (type filters on join), typed by name.
const channel = socket.channel("tournament:t1", {
  types: ["tournament_match.*"],
}) as TypedChannel & Channel;

channel.on("tournament_match.confirmed", (event) => {
  const tournament: string | number = event.payload.tournament_id;
  const org: string = event.org_id;
  // @ts-expect-error tournament_id is a string or a number, never a boolean
  const wrong: boolean = event.payload.tournament_id;
  console.log(tournament, org, wrong);
});

channel.on("notification.mention", (event) => {
  const type: `notification.${string}` = event.type;
  console.log(type, event.user_id);
});

const inhouse = socket.channel("inhouse:org-1") as TypedChannel & Channel;
inhouse.on("queue_update", (update: QueueUpdate) => {
  const players: number = update.player_count;
  const status: "open" | "check_in" | "closed" = update.status;
  // @ts-expect-error player_count is a number
  const text: string = update.player_count;
  console.log(players, status, text);
});

// @ts-expect-error an event the catalogue does not know is not typed as one
const unknown: EventMap["no_such.event"] = {} as never;

/** The union narrows on `type`. */
export function describe(event: ProstaffEvent): string {
  switch (event.type) {
    case "tournament_match.confirmed":
    case "tournament_match.walkover":
      return `match of ${event.payload.tournament_id}`;
    case "inhouse.session_started":
      return `queue ${event.payload.queue_id} started`;
    case "team_goal.completed":
      return `goal ${event.payload.goal_id}`;
    default:
      return event.type;
  }
}

channel
  .join()
  .receive("ok", () => console.log("joined", unknown))
  .receive("error", (reason: { reason: string }) => console.log(reason.reason));

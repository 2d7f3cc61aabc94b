// Generated from config/events/*.json by `prostaff-events catalogue typescript`.
// Do not edit: `cargo test` fails when this file and the schemas disagree.

/** What every event carries. Rails publishes it on prostaff:events:{org_id}; clients receive it whole as the push payload. */
export interface Envelope {
  /** An id: a string or an integer. */
  id?: string | number;
  org_id: string;
  /** The event's own data; see each type. */
  payload?: unknown;
  published_at?: string;
  type: string;
  user_id: string;
  /** Envelope version; absent means 1. */
  version?: "1" | 1;
  [key: string]: unknown;
}

/** Applied by the hub (never fanned out): ends an identity's access to an organisation or everywhere. */
export interface AccessRevoked extends Envelope {
  payload: {
    identity: string;
    /** The organisation of a scope org revocation (defaults to the envelope's org_id). */
    org_id?: string | number;
    reason?: string;
    scope: "org" | "all";
  };
  type: "access.revoked";
  [key: string]: unknown;
}

/** Pushed by the hub when it dropped broadcasts for a slow client (WebSocket/long-poll: on the topic; SSE: with the topic named). */
export interface EventsDropped {
  count: number;
  topic?: string;
}

/** A queue's check-in started; unchecked players are removed at the deadline. */
export interface InhouseCheckInStarted extends Envelope {
  payload: {
    check_in_deadline: string;
    entries?: Array<{
      checked_in?: boolean;
      /** An id: a string or an integer. */
      player_id: string | number;
      role?: string;
      [key: string]: unknown;
    }>;
    /** An id: a string or an integer. */
    queue_id: string | number;
    [key: string]: unknown;
  };
  type: "inhouse.check_in_started";
  [key: string]: unknown;
}

/** A queue closed. */
export interface InhouseQueueClosed extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    queue_id: string | number;
    [key: string]: unknown;
  };
  type: "inhouse.queue_closed";
  [key: string]: unknown;
}

/** A queue opened (or, with status check_in and a deadline, opened straight into check-in). */
export interface InhouseQueueOpened extends Envelope {
  payload: {
    check_in_deadline?: string | null;
    entries?: Array<{
      checked_in?: boolean;
      /** An id: a string or an integer. */
      player_id: string | number;
      role?: string;
      [key: string]: unknown;
    }>;
    /** An id: a string or an integer. */
    queue_id: string | number;
    status?: "open" | "check_in";
    [key: string]: unknown;
  };
  type: "inhouse.queue_opened";
  [key: string]: unknown;
}

/** A queue's game started: the hub closes that queue. */
export interface InhouseSessionStarted extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    queue_id: string | number;
    [key: string]: unknown;
  };
  type: "inhouse.session_started";
  [key: string]: unknown;
}

/** Every notification.* type: delivered to notifications:{user_id}, so user_id names the recipient. */
export interface Notification extends Envelope {
  payload?: {
    [key: string]: unknown;
  };
  type: `notification.${string}`;
  [key: string]: unknown;
}

/** A player left the organisation for another: the hub revokes that player's access to the envelope's organisation. */
export interface PlayerTransferred extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    player_id: string | number;
    /** An id: a string or an integer. */
    to_organization_id?: string | number;
    [key: string]: unknown;
  };
  type: "player.transferred";
  [key: string]: unknown;
}

/** Pushed by the hub on inhouse:{org_id} at every queue change (not an envelope: the queue's summary plus the change). */
export interface QueueUpdate {
  check_in_deadline?: string | null;
  checked_in_count?: number;
  entries: {
    [key: string]: {
      checked_in: boolean;
      role: string;
      [key: string]: unknown;
    };
  };
  event: "queue_opened" | "check_in_started" | "player_joined" | "player_left" | "player_checked_in" | "check_in_expired" | "queue_closed" | "queue_synced";
  org_id: string;
  player_count: number;
  player_id?: string;
  queue_closed?: boolean;
  queue_id: string;
  reason?: string;
  removed_count?: number;
  status: "open" | "check_in" | "closed";
  version?: number;
  [key: string]: unknown;
}

/** A player joined the roster. */
export interface RosterPlayerHired extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    player_id: string | number;
    [key: string]: unknown;
  };
  type: "roster.player_hired";
  [key: string]: unknown;
}

/** A player was removed from the roster: the hub revokes that player's access to the envelope's organisation. */
export interface RosterPlayerRemoved extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    player_id: string | number;
    [key: string]: unknown;
  };
  type: "roster.player_removed";
  [key: string]: unknown;
}

/** A scrim request was accepted. The payload's shape beyond its id is not fixed yet. */
export interface ScrimRequestAccepted extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    requesting_organization_id?: string | number;
    /** An id: a string or an integer. */
    scrim_request_id: string | number;
    /** An id: a string or an integer. */
    target_organization_id?: string | number;
    [key: string]: unknown;
  };
  type: "scrim_request.accepted";
  [key: string]: unknown;
}

/** A scrim request was declined. The payload's shape beyond its id is not fixed yet. */
export interface ScrimRequestDeclined extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    requesting_organization_id?: string | number;
    /** An id: a string or an integer. */
    scrim_request_id: string | number;
    /** An id: a string or an integer. */
    target_organization_id?: string | number;
    [key: string]: unknown;
  };
  type: "scrim_request.declined";
  [key: string]: unknown;
}

/** A team goal is at risk of being missed. The payload's shape beyond its id is not fixed yet. */
export interface TeamGoalAtRisk extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    goal_id: string | number;
    progress?: number;
    [key: string]: unknown;
  };
  type: "team_goal.at_risk";
  [key: string]: unknown;
}

/** A team goal was completed. The payload's shape beyond its id is not fixed yet. */
export interface TeamGoalCompleted extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    goal_id: string | number;
    progress?: number;
    [key: string]: unknown;
  };
  type: "team_goal.completed";
  [key: string]: unknown;
}

/** A team goal was missed. The payload's shape beyond its id is not fixed yet. */
export interface TeamGoalMissed extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    goal_id: string | number;
    progress?: number;
    [key: string]: unknown;
  };
  type: "team_goal.missed";
  [key: string]: unknown;
}

/** A team goal's progress changed. The payload's shape beyond its id is not fixed yet. */
export interface TeamGoalProgressUpdated extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    goal_id: string | number;
    progress?: number;
    [key: string]: unknown;
  };
  type: "team_goal.progress_updated";
  [key: string]: unknown;
}

/** A tournament match was confirmed; routed to tournament:{payload.tournament_id}. */
export interface TournamentMatchConfirmed extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    match_id?: string | number;
    /** An id: a string or an integer. */
    tournament_id: string | number;
    [key: string]: unknown;
  };
  type: "tournament_match.confirmed";
  [key: string]: unknown;
}

/** A tournament match ended in a walkover; routed to tournament:{payload.tournament_id}. */
export interface TournamentMatchWalkover extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    match_id?: string | number;
    /** An id: a string or an integer. */
    tournament_id: string | number;
    [key: string]: unknown;
  };
  type: "tournament_match.walkover";
  [key: string]: unknown;
}

/** Every other tournament_match.* type: routed to tournament:{payload.tournament_id}, so it needs one. */
export interface TournamentMatchEvent extends Envelope {
  payload: {
    /** An id: a string or an integer. */
    tournament_id: string | number;
    [key: string]: unknown;
  };
  type: `tournament_match.${string}`;
  [key: string]: unknown;
}

/** Every envelope a channel can receive, discriminated on `type`. */
export type ProstaffEvent =
  | InhouseCheckInStarted
  | InhouseQueueClosed
  | InhouseQueueOpened
  | InhouseSessionStarted
  | Notification
  | PlayerTransferred
  | RosterPlayerHired
  | RosterPlayerRemoved
  | ScrimRequestAccepted
  | ScrimRequestDeclined
  | TeamGoalAtRisk
  | TeamGoalCompleted
  | TeamGoalMissed
  | TeamGoalProgressUpdated
  | TournamentMatchConfirmed
  | TournamentMatchWalkover
  | TournamentMatchEvent;

/** Push event name → its payload. */
export interface EventMap {
  "events_dropped": EventsDropped;
  "inhouse.check_in_started": InhouseCheckInStarted;
  "inhouse.queue_closed": InhouseQueueClosed;
  "inhouse.queue_opened": InhouseQueueOpened;
  "inhouse.session_started": InhouseSessionStarted;
  [event: `notification.${string}`]: Notification;
  "player.transferred": PlayerTransferred;
  "queue_update": QueueUpdate;
  "roster.player_hired": RosterPlayerHired;
  "roster.player_removed": RosterPlayerRemoved;
  "scrim_request.accepted": ScrimRequestAccepted;
  "scrim_request.declined": ScrimRequestDeclined;
  "team_goal.at_risk": TeamGoalAtRisk;
  "team_goal.completed": TeamGoalCompleted;
  "team_goal.missed": TeamGoalMissed;
  "team_goal.progress_updated": TeamGoalProgressUpdated;
  "tournament_match.confirmed": TournamentMatchConfirmed;
  "tournament_match.walkover": TournamentMatchWalkover;
  [event: `tournament_match.${string}`]: TournamentMatchEvent;
}

/** A push event name the catalogue knows. */
export type EventName = keyof EventMap & string;

/** The typed `on` of a phoenix.js `Channel`: `channel as Channel & TypedChannel`. */
export interface TypedChannel {
  on<K extends EventName>(event: K, callback: (payload: EventMap[K]) => void): number;
}

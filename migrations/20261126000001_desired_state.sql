-- The desired state as last applied from the config repository.
--
-- Only the executor writes these tables, inside its apply transaction and under the apply advisory lock;
-- everything else reads them. Each resource keeps the applied resource as JSON (`spec`, what a plan diffs
-- field by field) and a hash of it (`spec_hash`), plus the few fields SQL itself
-- needs (capacity, prices, references) as typed columns. The store fills both from the same value;
-- `spec_hash` is `sha256:` and the hex SHA-256 of the JSON the store wrote, so an upsert that changes
-- nothing writes nothing.
--
-- References between resources are DEFERRABLE INITIALLY DEFERRED: a commit is applied whole, and in
-- the middle of its transaction an app may briefly point at a plan that is inserted a statement later.

-- One row: which config commit is applied, and its generation (incremented by every apply that changes
-- something). A planner that read generation N may only apply if it is still N under the lock.
CREATE TABLE config_state (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    -- NULL until the first apply.
    commit      text CHECK (commit <> ''),
    generation  bigint NOT NULL DEFAULT 0 CHECK (generation >= 0),
    -- cairn.toml as applied (base domain, currency, recipients); NULL until the first apply.
    settings    jsonb,
    applied_at  timestamptz,
    CHECK ((generation = 0) = (applied_at IS NULL))
);
INSERT INTO config_state (id) VALUES (true);

CREATE TABLE plans (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    cpu_millis    integer NOT NULL CHECK (cpu_millis > 0),
    memory_bytes  bigint NOT NULL CHECK (memory_bytes > 0),
    disk_bytes    bigint NOT NULL CHECK (disk_bytes >= 0),
    -- Monthly price of one replica, in config_state.settings->>'currency'.
    price         numeric NOT NULL CHECK (price >= 0),
    max_replicas  integer NOT NULL CHECK (max_replicas >= 1),
    spec          jsonb NOT NULL,
    spec_hash     text NOT NULL,
    -- The config generation that created or last changed the row.
    generation    bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE runtimes (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    drivers     text[] NOT NULL CHECK (drivers <> '{}' AND drivers <@ ARRAY['docker', 'process']),
    spec        jsonb NOT NULL,
    spec_hash   text NOT NULL,
    generation  bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Nodes as declared. What their agents report lives in node_status.
CREATE TABLE nodes (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    cpu_millis    integer NOT NULL CHECK (cpu_millis > 0),
    memory_bytes  bigint NOT NULL CHECK (memory_bytes > 0),
    disk_bytes    bigint NOT NULL CHECK (disk_bytes >= 0),
    region        text,
    labels        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(labels) = 'object'),
    -- Keeps what runs, gets nothing new.
    drain         boolean NOT NULL DEFAULT false,
    -- The age recipient the manifest pins, if any (the joined one is node_status.recipient).
    recipient     text CHECK (recipient LIKE 'age1%'),
    spec          jsonb NOT NULL,
    spec_hash     text NOT NULL,
    generation    bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE apps (
    name              text PRIMARY KEY CHECK (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    plan              text NOT NULL REFERENCES plans (name) DEFERRABLE INITIALLY DEFERRED,
    runtime           text NOT NULL REFERENCES runtimes (name) DEFERRABLE INITIALLY DEFERRED,
    replicas          integer NOT NULL CHECK (replicas >= 0),
    -- Runs no replica, keeps its configuration and releases.
    suspended         boolean NOT NULL DEFAULT false,
    -- Set by an operator's rollback, not by the repository: applying a commit leaves it alone. The app
    -- then stays on this release and ignores pushes until the pin is cleared. (Its foreign key to
    -- releases is added with that table.)
    pinned_release    bigint,
    -- The app as applied (`observed::AppliedApp`): env values reduced to plain values and, for secrets,
    -- fingerprints. The ciphertexts are in app_env.
    spec              jsonb NOT NULL,
    spec_hash         text NOT NULL,
    generation        bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX apps_plan ON apps (plan);
CREATE INDEX apps_runtime ON apps (runtime);

-- One row per app environment variable, for change detection per key.
CREATE TABLE app_env (
    app          text NOT NULL REFERENCES apps (name) ON DELETE CASCADE,
    key          text NOT NULL CHECK (key ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    secret       boolean NOT NULL,
    -- A plain value, or for a secret the armored age ciphertext from the repository.
    value        text NOT NULL,
    -- For a secret, the keyed hash of its plaintext (the control plane's identity is the key):
    -- re-encrypting a secret to new recipients changes `value` but not this, so the plan does not call
    -- it a change. NULL for a plain value, which compares as itself.
    fingerprint  text CHECK (fingerprint <> ''),
    PRIMARY KEY (app, key),
    CHECK (secret = (fingerprint IS NOT NULL)),
    -- The last line of defence for "no plaintext secret in Postgres".
    CONSTRAINT secret_is_age_ciphertext
        CHECK (NOT secret OR value LIKE '-----BEGIN AGE ENCRYPTED FILE-----%')
);

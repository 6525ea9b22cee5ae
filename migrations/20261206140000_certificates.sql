-- Issue 15: certificates the control plane orders from an ACME CA for the names declared in git.
--
-- One row per name set (an app's `<app>.<base_domain>` and its `domains`, sorted). Private keys are stored
-- only as age ciphertexts to the control plane's recipient (`key_sealed`, `credentials_sealed`): a dump of
-- the database holds no key in plaintext. The old certificate stays in its row until the renewed one
-- replaces it in the same UPDATE, so there is never a moment without one.
--
-- One order per name set at a time across control planes: a worker claims a row with FOR UPDATE SKIP LOCKED
-- and holds a lease (`lease_owner`, `lease_until`) while it talks to the CA (no transaction stays open); it
-- writes the outcome only while its lease is still the row's.
CREATE TABLE certificates (
    names            text[] PRIMARY KEY CHECK (cardinality(names) >= 1),
    -- The app that declares the names (for `cairn certs`; a name set belongs to one app).
    app              text NOT NULL,
    -- The ACME directory the certificate is (to be) ordered from.
    directory        text NOT NULL CHECK (directory LIKE 'https://%'),
    -- Whether the applied state still declares the names: undeclared rows are never worked on.
    declared         boolean NOT NULL DEFAULT true,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'waiting_dns', 'ordering', 'issued', 'renewing', 'failed')),
    last_error       text,
    -- Failed attempts in a row (self-probe or order); reset by an issuance.
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- The current certificate, if one was ever issued (kept through a renewal until replaced).
    chain_pem        text,
    key_sealed       text CHECK (key_sealed LIKE '-----BEGIN AGE ENCRYPTED FILE-----%'),
    serial           text,
    issuer           text,
    not_before       timestamptz,
    not_after        timestamptz,
    issued_at        timestamptz,
    lease_owner      uuid,
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((chain_pem IS NULL) = (key_sealed IS NULL)),
    CHECK ((chain_pem IS NULL) = (not_after IS NULL)),
    CHECK ((lease_owner IS NULL) = (lease_until IS NULL))
);
CREATE INDEX certificates_due ON certificates (next_attempt_at) WHERE declared;

-- The ACME account per directory; its credentials (the account key among them) sealed like the keys.
CREATE TABLE acme_accounts (
    directory           text PRIMARY KEY CHECK (directory LIKE 'https://%'),
    credentials_sealed  text NOT NULL CHECK (credentials_sealed LIKE '-----BEGIN AGE ENCRYPTED FILE-----%'),
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- What goes into the TLS table every control plane hands its agents, kept in the database so an agent
-- polling any replica gets the same table (reconciler/src/store/tls.rs): the ACME answers in flight,
-- which only the replica running an order knew, and the applied apps' own certificates, which only the
-- leader that applied them knew.

-- The answers a certificate worker put up for an order it runs: HTTP-01 tokens (and its probes') with
-- their key authorizations, TLS-ALPN-01 names with the digest. Not secret (a CA fetches them over plain
-- HTTP). A replica replaces its own rows whole; rows of a replica that died mid-order are pruned by age.
CREATE TABLE acme_answers (
    kind      text NOT NULL CHECK (kind IN ('http-01', 'tls-alpn-01')),
    key       text NOT NULL CHECK (key <> ''),
    answer    text NOT NULL,
    replica   uuid NOT NULL,
    added_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (kind, key)
);
CREATE INDEX acme_answers_by_replica ON acme_answers (replica);

-- The applied apps' own certificates (`tls = { cert, key }`): the chain from the repository and the key
-- as the manifest's age ciphertext (sealed to the control plane's recipient; never plaintext).
CREATE TABLE own_certificates (
    id          text PRIMARY KEY,
    names       text[] NOT NULL,
    chain_pem   text NOT NULL,
    key_sealed  text NOT NULL
);

-- One row once a control plane wrote the applied set (empty included): until then no replica hands out
-- a TLS table, which would lack them (an agent installs a table whole and would stop serving them).
CREATE TABLE own_certificates_applied (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    commit      text NOT NULL,
    digest      text NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

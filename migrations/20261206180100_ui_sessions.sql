-- Issue 19: the web dashboard.
--
-- An admin token has a role: `operator` may do what the admin API's write endpoints and the
-- dashboard's actions do (rollback, unpin, restart, deploy, join tokens, credentials, notification
-- tests); `viewer` may only read. Tokens made before roles existed could do everything: they stay
-- operators.
ALTER TABLE admin_tokens
    ADD COLUMN role text NOT NULL DEFAULT 'operator' CHECK (role IN ('viewer', 'operator'));

-- A dashboard sign-in: an admin token exchanged for a random session id kept in an HttpOnly cookie.
-- Only the id's hash is stored (like tokens); the session dies with its token's revocation (checked at
-- each request through the join) and at `expires_at`.
CREATE TABLE ui_sessions (
    id_hash     text PRIMARY KEY CHECK (id_hash ~ '^sha256:[0-9a-f]{64}$'),
    token_id    bigint NOT NULL REFERENCES admin_tokens (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX ui_sessions_expires_at ON ui_sessions (expires_at);

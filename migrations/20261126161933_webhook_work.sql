-- The work webhook deliveries leave behind, and what Cairn has told GitHub (webhook/src/store.rs).
--
-- A delivery's handler only records here, in the transaction that marks the delivery handled, and
-- wakes the workers with `NOTIFY cairn_webhook_work` (delivered at commit); the workers do the remote
-- part afterwards (asking a git remote for a branch head, fetching and planning a pull request), each
-- from a row it leases, so a crash loses nothing and nothing runs twice at once.

-- Branch heads to ask an app's remote for, after a push to the branch it follows. One row per app:
-- a newer push replaces the request (`version` goes up), and the checker that asked for an older
-- version leaves the row for the newer one. The row is deleted once the head is recorded in
-- `source_heads`. Whatever order pushes arrive in, the head recorded is the one the remote has when
-- it is asked, never a payload's `after`.
CREATE TABLE webhook_head_checks (
    app             text PRIMARY KEY CHECK (app ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    -- The app's source URL as its manifest says (operator rewrites apply when asking).
    url             text NOT NULL CHECK (url <> ''),
    branch          text NOT NULL CHECK (branch <> ''),
    delivery_id     text NOT NULL,
    version         integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- A checker holds the row until then.
    leased_until    timestamptz,
    last_error      text,
    requested_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_head_checks_due ON webhook_head_checks (next_attempt_at);

-- Which push brought which commit of an app, and when Cairn received it: the start of "push to
-- running" on the `cairn/deploy` status. The first delivery of a commit wins.
CREATE TABLE webhook_pushes (
    app          text NOT NULL,
    commit       text NOT NULL CHECK (commit ~ '^([0-9a-f]{40}|[0-9a-f]{64})$'),
    delivery_id  text NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (app, commit)
);
CREATE INDEX webhook_pushes_received_at ON webhook_pushes (received_at);

-- Pull requests to the config repository waiting for a plan, one row per pull request. A delivery
-- bumps `requested_version`; the planner leases the row, fetches `refs/pull/N/head` (whatever it
-- points at then: the newest head wins, whatever order deliveries arrive in), plans it, and in one
-- transaction enqueues the comment and the `cairn/plan` status and sets `planned_version` to the
-- version it started from, if its lease (`lease_token`) is still the row's. A request that arrived
-- meanwhile leaves the row due again.
CREATE SEQUENCE github_pr_plan_leases AS bigint;

CREATE TABLE github_pr_plans (
    -- owner/name, lowercase (GitHub compares names without case), and as GitHub spells it.
    repo_key          text NOT NULL,
    repo              text NOT NULL CHECK (repo ~ '^[^/\s]+/[^/\s]+$'),
    pr                bigint NOT NULL CHECK (pr > 0),
    -- https://github.com/owner/name: the base of links to the files at the head.
    html_url          text NOT NULL,
    -- The head the latest delivery named, and whether it lives outside the repository (a fork: its
    -- secrets are never decrypted).
    head_sha          text NOT NULL CHECK (head_sha ~ '^([0-9a-f]{40}|[0-9a-f]{64})$'),
    fork              boolean NOT NULL,
    delivery_id       text NOT NULL,
    requested_version integer NOT NULL DEFAULT 1 CHECK (requested_version >= 1),
    planned_version   integer NOT NULL DEFAULT 0 CHECK (planned_version >= 0),
    -- The commit the last plan was made from.
    planned_sha       text,
    -- Times the head was planned before the fetched ref showed the delivery's head (GitHub updates
    -- `refs/pull/N/head` asynchronously): bounded, then the fetched head is taken as it is.
    rechecks          integer NOT NULL DEFAULT 0 CHECK (rechecks >= 0),
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    leased_until      timestamptz,
    lease_token       bigint,
    last_error        text,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    planned_at        timestamptz,
    PRIMARY KEY (repo_key, pr)
);
CREATE INDEX github_pr_plans_due ON github_pr_plans (next_attempt_at)
    WHERE requested_version > planned_version;

-- The last state Cairn enqueued for each commit status, so that a reconcile repeated on the same
-- commit (every interval, for an invalid one) does not post the same status again.
CREATE TABLE github_commit_statuses (
    repo         text NOT NULL,
    sha          text NOT NULL,
    context      text NOT NULL,
    state        text NOT NULL CHECK (state IN ('pending', 'success', 'failure', 'error')),
    description  text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repo, sha, context)
);
CREATE INDEX github_commit_statuses_updated_at ON github_commit_statuses (updated_at);

-- Releases whose source commit is on GitHub: where their `cairn/deploy` status goes once the agents
-- report the outcome (webhook/src/statuses.rs).
CREATE TABLE github_deploys (
    app          text NOT NULL,
    release      bigint NOT NULL CHECK (release > 0),
    repo         text NOT NULL CHECK (repo ~ '^[^/\s]+/[^/\s]+$'),
    sha          text NOT NULL,
    -- When the push that brought the commit was received, if a push did.
    pushed_at    timestamptz,
    planned_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (app, release)
);
CREATE INDEX github_deploys_planned_at ON github_deploys (planned_at);

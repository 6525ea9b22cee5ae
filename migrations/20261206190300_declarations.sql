-- Where the config repository declares each app and node: the dashboard's link to the file and line
-- (reconciler/src/declared.rs). Display only, written after an apply by the control plane that applied
-- it, and only the rows that moved; each row names the commit whose file has the resource at that line,
-- so a link is right even while another control plane's rows are of a newer commit.
CREATE TABLE declarations (
    kind    text NOT NULL CHECK (kind IN ('app', 'node')),
    name    text NOT NULL,
    commit  text NOT NULL CHECK (commit <> ''),
    path    text NOT NULL,
    line    integer NOT NULL CHECK (line >= 1),
    PRIMARY KEY (kind, name)
);

-- The build key of a release (`cairn_proto::build`: its source commit and build recipe). Releases that
-- share it run one image: a node deploying one of them is handed the image another release of the key
-- pushed, instead of building it again. NULL for releases recorded before build keys (they share with
-- nobody). Expand only: an older control plane neither reads nor writes it.
ALTER TABLE releases ADD COLUMN build_key text CHECK (build_key ~ '^[0-9a-f]{32}$');

CREATE INDEX releases_build_key ON releases (app, build_key) WHERE build_key IS NOT NULL;

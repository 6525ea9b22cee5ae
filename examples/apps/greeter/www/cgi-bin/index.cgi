#!/bin/sh
# busybox httpd runs this for `/` (there is no index.html): a plain-text answer from the GREETING env
# var that examples/local/apps/greeter.toml sets.
printf 'Content-Type: text/plain\r\n\r\n'
printf '%s\n' "${GREETING:-Hello}"

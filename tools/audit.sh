#!/usr/bin/env bash
# Audit requirements.lock for known vulnerabilities (SECURITY.md says how to triage the result).
#   tools/audit.sh            # table on stdout, JSON in ${AUDIT_JSON:-/tmp/fbta-audit.json}
# pip-audit lives in its own throwaway venv (${AUDIT_VENV:-/tmp/audit-venv}), never in .venv or the lock.
# Exit 0: every pinned package was checked and none has a known vulnerability; 1: vulnerabilities found;
# 3: some packages could not be checked. pip-audit itself says "No known vulnerabilities found" even when it
# skipped every package (a registry mirror without PyPI's per-version JSON API), so the skips are counted here.
set -euo pipefail
cd "$(dirname "$0")/.."
AUDIT_VENV=${AUDIT_VENV:-/tmp/audit-venv}
AUDIT_JSON=${AUDIT_JSON:-/tmp/fbta-audit.json}
if [ ! -x "$AUDIT_VENV/bin/pip-audit" ]; then
  "${PYTHON:-python3}" -m venv "$AUDIT_VENV"
  "$AUDIT_VENV/bin/pip" install -q pip-audit
fi
"$AUDIT_VENV/bin/pip-audit" -r requirements.lock --no-deps --disable-pip --progress-spinner off \
  -f json -o "$AUDIT_JSON" "$@" 2>/dev/null || true   # its exit code counts vulnerabilities, not skips: see below
"$AUDIT_VENV/bin/python" - "$AUDIT_JSON" <<'PY'
import json, sys
deps = json.load(open(sys.argv[1]))["dependencies"]
skipped = [d for d in deps if d.get("skip_reason")]
vulns = [(d["name"], d["version"], v) for d in deps for v in d.get("vulns", [])]
print(f"pip-audit: {len(deps)} pinned packages, {len(deps) - len(skipped)} checked, {len(skipped)} not checked, "
      f"{len(vulns)} known vulnerabilities")
for name, version, v in vulns:
    print(f"  {name}=={version}  {v['id']}  fixed in: {', '.join(v.get('fix_versions') or []) or 'no fix'}  "
          f"aliases: {', '.join(v.get('aliases') or [])}")
for d in skipped[:5]:
    print(f"  not checked: {d['skip_reason']}")
if len(skipped) > 5:
    print(f"  … and {len(skipped) - 5} more not checked (see {sys.argv[1]})")
sys.exit(1 if vulns else 3 if skipped else 0)
PY

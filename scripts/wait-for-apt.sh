#!/usr/bin/env bash
# bl_wait_for_apt: wait (bounded) until no other apt/dpkg process holds the package locks.
# Sourced by scripts/install.sh. apt and dpkg take fcntl locks, so they are probed the same
# way (python3's fcntl.lockf, a non-blocking F_SETLK that is released at once); apt-get is
# then run with -o DPkg::Lock::Timeout for the moment between the probe and its own lock.
#   BLUELOWER_APT_LOCK_WAIT  seconds to wait at most (default 600)
#   BLUELOWER_APT_LOCKS      the lock files (default: dpkg's, apt's lists and archives locks)
bl_wait_for_apt() {
  local limit="${BLUELOWER_APT_LOCK_WAIT:-600}" waited=0 step=2 said=0
  local locks="${BLUELOWER_APT_LOCKS:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock}"
  while ! "${PY:-python3}" - $locks <<'PYEOF' 2>/dev/null
import fcntl, os, sys
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    with open(path, "r+b") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(1)
PYEOF
  do
    if [ "$waited" -ge "$limit" ]; then
      echo "[install] error: another apt/dpkg process still holds its lock after ${waited} s; retry when it has" \
           "finished (or set BLUELOWER_APT_LOCK_WAIT=SECONDS)" >&2
      return 1
    fi
    if [ "$said" = 0 ]; then
      echo "[install] waiting for another apt/dpkg process to finish (at most ${limit} s) ..." >&2
      said=1
    fi
    sleep "$step"
    waited=$((waited + step))
  done
  [ "$said" = 0 ] || echo "[install] apt/dpkg is free after ${waited} s" >&2
  return 0
}

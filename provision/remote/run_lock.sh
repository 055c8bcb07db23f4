# The run lock's keeper (provision/runlock.py), run by bash as root after stop_groups.sh:
#   $1 state dir, $2 owner line, $3 run id, $4 lease (s).
# Takes flock(1) on <state dir>/run.lock and holds it while heartbeats (lines) come on stdin.
# First line out: `locked<TAB><the expired lease it took over, or nothing>`, or
# `busy <owner of the holder><TAB><seconds since its last heartbeat>` (exit 75), or an error.
# When stdin closes (released, the run died, its session closed) or no heartbeat came for the
# lease, it stops every process group of the run (stop_groups) and lets the lock go; a lease that
# ran out leaves run.expired for the next run to report.
d=$1; owner=$2; run=$3; lease=$4
mkdir -p "$d" || exit 1
exec 9>>"$d/run.lock" || exit 1
flock -n -E 75 9; rc=$?
if [ "$rc" != 0 ]; then
  if [ "$rc" = 75 ]; then
    who=$(head -n 1 "$d/run.owner" 2>/dev/null); age=""
    [ -e "$d/run.owner" ] && age=$(( $(date +%s) - $(stat -c %Y "$d/run.owner") ))
    printf 'busy %s\t%s\n' "${who:-an unknown run}" "$age"
  fi
  exit "$rc"
fi
took=""
if [ -s "$d/run.expired" ]; then took=$(head -n 1 "$d/run.expired"); fi
rm -f "$d/run.expired"
printf '%s\n' "$owner" > "$d/run.owner" || exit 1
printf 'locked\t%s\n' "$took"
why=released
while :; do
  IFS= read -r -t "$lease" _; rc=$?
  if [ "$rc" = 0 ]; then touch "$d/run.owner"; continue; fi
  [ "$rc" -gt 128 ] && why=expired
  break
done
stop_groups "" "$run"
if [ "$why" = expired ]; then
  printf '%s; its lease ran out at %s (no heartbeat for %s s)\n' "$owner" \
    "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$lease" > "$d/run.expired"
fi
rm -f "$d/run.owner"

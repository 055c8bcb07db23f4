# One llama-bench invocation on a rig, run under `setsid -w` (its process group is what the control
# machine kills on Ctrl-C): a power sampler in the background, llama-bench's stderr time-stamped
# line by line (its --progress lines mark the phases), then everything printed between markers
# (@@out, @@events, @@power, @@rc: provision/bench/parse.py). Passed whole to `sh -c` by
# provision/bench/run.py:
#   sh -c SOURCE bench_point WORKDIR SAMPLE(0|1) INTERVAL QUERY [NAME=VALUE ...] -- ARGV...
# WORKDIR/pid: the process group to kill; WORKDIR is removed at the end. QUERY: the nvidia-smi
# power query (split into words, no globbing). NAME=VALUE: environment for llama-bench.
set -u
set -f
d=$1 sample=$2 interval=$3 query=$4
shift 4
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  export "$1"
  shift
done
[ $# -gt 0 ] && shift
mkdir -p "$d" && chmod 700 "$d" || exit 90
echo $$ > "$d/pid"
: > "$d/power"
main=$$
sp=
if [ "$sample" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  ( while kill -0 "$main" 2>/dev/null; do
      t=$(date +%s.%N)
      $query 2>/dev/null | sed "s/^/P $t /"
      sleep "$interval"
    done ) >> "$d/power" 2>/dev/null &
  sp=$!
fi
stop_sampler() {
  if [ -n "$sp" ]; then
    kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null; sp=
    # a point shorter than the first sample (a loaded box, a tiny model): one sample at its end
    if ! grep -q '^P ' "$d/power" 2>/dev/null; then
      t=$(date +%s.%N); $query 2>/dev/null | sed "s/^/P $t /" >> "$d/power"
    fi
  fi
}
trap stop_sampler EXIT
trap 'exit 130' HUP INT TERM
echo "E $(date +%s.%N) @@start" > "$d/events"
{ { "$@"; echo $? > "$d/rc"; } 2>&1 1>"$d/out" | while IFS= read -r l; do printf 'E %s %s\n' "$(date +%s.%N)" "$l"; done >> "$d/events"; }
echo "E $(date +%s.%N) @@end" >> "$d/events"
stop_sampler
echo @@out; cat "$d/out"; echo @@events; cat "$d/events"; echo @@power; cat "$d/power"; echo @@rc; cat "$d/rc" 2>/dev/null || echo 255
rm -rf "$d"

# Shell functions sourced into the run lock's keeper (run_lock.sh) and into the line that stops a
# command's process group (provision/keeper.py kill_line); the caller sets $stop_ticks first (how
# many 0.1 s waits between TERM and KILL). Root is needed to read other users' environments.
#
#   stop_groups PGIDS RUN   TERM the process groups PGIDS and every group holding a process
#                           tagged LLAMA_RIG_RUN=RUN (apt runs dpkg in a session of its own, on a
#                           pty) -- never the caller's own group -- wait, then KILL what is left.

# a group whose members are all zombies (their reaper is slow) is gone: with ps, ask for the live
# members of the session (every group here leads its session)
alive() {
  if command -v ps >/dev/null 2>&1; then ps -o stat= -s "$1" 2>/dev/null | grep -qv '^Z'
  else kill -0 "-$1" 2>/dev/null; fi
}
stop_groups() {
  me=$(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3); pgs=''
  for g in $1; do [ "$g" != "$me" ] && pgs="$pgs $g"; done
  if [ -n "$2" ]; then
    for f in $(grep -lzx "LLAMA_RIG_RUN=$2" /proc/[0-9]*/environ 2>/dev/null); do
      p=${f#/proc/}; p=${p%/environ}
      g=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f3)
      case " $me $pgs " in *" $g "*) ;; *) [ -n "$g" ] && pgs="$pgs $g" ;; esac
    done
  fi
  [ -n "$pgs" ] || return 0
  for g in $pgs; do kill -TERM "-$g" 2>/dev/null; done
  i=0
  while [ $i -lt "${stop_ticks:-10}" ]; do
    left=''; for g in $pgs; do alive "$g" && left="$left $g"; done
    [ -z "$left" ] && break; sleep 0.1; i=$((i+1))
  done
  for g in $pgs; do kill -KILL "-$g" 2>/dev/null; done
  return 0
}

# Resumable steps for the experiment scripts (sourced by experiments.sh and sft_budget.sh; RUN names the run
# directory): a finished step leaves a marker in $RUN/.done/ and is skipped next time; wall seconds go to
# $RUN/.done/times.
step() {  # step NAME COMMAND...: run once; a marker records success
  local name=$1 t=$SECONDS; shift
  if [ -e "$RUN/.done/$name" ]; then echo "== $RUN: $name done before, skipped"; return; fi
  echo "== $RUN: $name"
  "$@"
  mkdir -p "$RUN/.done" && touch "$RUN/.done/$name"
  echo "$name $((SECONDS - t)) s" | tee -a "$RUN/.done/times"
}
both() {  # two python command lines side by side (LAYOUT=sequential: one after the other); fails if either fails
  if [ "${LAYOUT:-side_by_side}" = sequential ]; then
    python $1 && python $2
    return
  fi
  python $1 & local a=$!
  python $2 & local b=$!
  wait $a && wait $b
}
timed() {  # timed NAME COMMAND...: always runs (the stage resumes by itself), logs its wall time
  local name=$1 t=$SECONDS; shift
  echo "== $RUN: $name"
  "$@"
  mkdir -p "$RUN/.done" && echo "$name $((SECONDS - t)) s" | tee -a "$RUN/.done/times"
}

# shellcheck shell=bash
# Helpers shared by launch/tpu_vm.sh and launch/gke/render.sh (sourced, never run).
# launch/slurm.sbatch keeps its own copy: sbatch runs a spooled copy of the script, away
# from this directory.

DRY_RUN=${DRY_RUN:-0}

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# Shell-quote one word, readably: bare when safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Shell-quote words and join them with spaces: a line one can paste into a shell.
quote_all() {
  local out=() word
  for word in "$@"; do
    out+=("$(quote "$word")")
  done
  printf '%s' "${out[*]}"
}

# Run a command, or with --dry-run print it exactly (one line, shell-quoted) instead.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_all "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_all "$@")" >&2
  "$@"
}

# Announce a step: a comment in the dry-run listing, a banner on stderr otherwise.
step() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '# %s\n' "$*"
  else
    printf '==> %s\n' "$*" >&2
  fi
}

# require VALUE FLAG ENVVAR: a missing required parameter is a usage error.
require() {
  [[ -n $1 ]] || die "missing required parameter $2 (or set \$$3); see --help"
}

# need_value FLAG ARGC: a flag that takes a value must have one.
need_value() {
  (($2 >= 2)) || die "$1 needs a value; see --help"
}

positive_int() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2 must be a positive integer, got '$1'"
}

non_negative_int() {
  [[ $1 =~ ^[0-9]+$ ]] || die "$2 must be a non-negative integer, got '$1'"
}

#!/bin/sh
# The system packages grpo-ray needs beyond pip: `make setup` (so `make run` / `make test`) and
# .ci/run call this. All present: a quick no-op (no apt). Missing, as root with apt-get: install
# them quietly. Otherwise: one line per missing package saying what to install; never fails.
#   bubblewrap  bwrap, the code verifier's sandbox (without it every code check scores 0)
#   util-linux  setpriv, which drops the sandbox to uid 65534
#   libnuma1    libnuma.so.1, linked by vLLM's CPU kernels (vllm._C)
# Testing: GRPO_RAY_SYSDEPS_MISSING="bubblewrap libnuma1" treats those as missing;
# GRPO_RAY_SYSDEPS_DRY_RUN=1 prints the apt-get command instead of running it.
set -u

have_libnuma() {
  cache=$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)
  case "$cache" in *libnuma.so.1*) return 0 ;; esac
  for dir in /lib /usr/lib /lib64 /usr/lib64 /lib/*-linux-gnu /usr/lib/*-linux-gnu; do
    [ -e "$dir/libnuma.so.1" ] && return 0
  done
  return 1
}

present() {  # present PACKAGE: is what grpo-ray needs from it installed?
  case " ${GRPO_RAY_SYSDEPS_MISSING:-} " in *" $1 "*) return 1 ;; esac
  case "$1" in
    bubblewrap) command -v bwrap >/dev/null 2>&1 ;;
    util-linux) command -v setpriv >/dev/null 2>&1 ;;
    libnuma1) have_libnuma ;;
  esac
}

missing_packages() {
  out=""
  for pkg in bubblewrap util-linux libnuma1; do
    present "$pkg" || out="$out $pkg"
  done
  echo "$out"
}

missing=$(missing_packages)
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "grpo-ray: installing system packages:$missing"
  if [ -n "${GRPO_RAY_SYSDEPS_DRY_RUN:-}" ]; then
    echo "grpo-ray: (dry run) would run: apt-get update -qq && apt-get install -y -qq$missing"
  else
    # shellcheck disable=SC2086  # $missing is a list of package names
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >/dev/null \
      || echo "grpo-ray: warning: apt-get install$missing failed; continuing with what is installed"
    missing=$(missing_packages)
  fi
fi

for pkg in $missing; do
  case "$pkg" in
    bubblewrap) what="the code verifier's sandbox needs bubblewrap" ;;
    util-linux) what="the code verifier's sandbox needs setpriv (package util-linux)" ;;
    libnuma1) what="vLLM's CPU kernels need libnuma.so.1 (package libnuma1)" ;;
  esac
  echo "grpo-ray: $what: install it with your package manager (e.g. sudo apt-get install $pkg)"
done
exit 0

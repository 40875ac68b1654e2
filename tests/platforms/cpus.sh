#!/usr/bin/env bash
# The CPU matrix of `make test` (target test-cpus): the Go tests (the packages of GO_PACKAGES below, ending with
# gomerge/kernels) and the built-in example through the Python extension, on every CPU level this machine runs or
# emulates with Debian's qemu-user:
#   native           this machine's CPU (its kernel set read from /proc/cpuinfo's flags)
#   -cpu Nehalem     x86-64 without AVX: the portable kernels ("go")
#   -cpu Haswell     AVX2 without AVX-512: the "avx2" kernels
#   qemu-aarch64     the Go tests built for GOARCH=arm64 (portable kernels)
# QEMU cannot emulate AVX-512: the "avx512" set runs only natively, where the CPU has it (the Go tests' summary line
# says which sets ran). Each level checks that the engine chose the set expected there.
set -euo pipefail
unset GOMERGE_KERNELS
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GO=${GO:-go}
QEMU=$PWD/.build/qemu/usr/bin
BIN=$PWD/.build/cpus
mkdir -p "$BIN"

# the native level's expected set, from the CPU's flags
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
native=go
if [[ $(uname -m) == x86_64 ]]; then
	has() { for f in "$@"; do [[ $flags == *" $f "* ]] || return 1; done; }
	if has avx512f avx512cd avx512bw avx512dq avx512vl; then native=avx512; elif has avx avx2; then native=avx2; fi
fi

# the test binaries of the packages whose results depend on the kernels, for amd64 and arm64; the kernels' own last
GO_PACKAGES=(gomerge gomerge/methods gomerge/fuse gomerge/extract gomerge/linalg gomerge/safetensors gomerge/kernels)
for dir in "${GO_PACKAGES[@]}"; do
	GOEXPERIMENT=simd "$GO" test -c -o "$BIN/${dir##*/}-amd64.test" "./$dir"
	CGO_ENABLED=0 GOARCH=arm64 GOEXPERIMENT=simd "$GO" test -c -o "$BIN/${dir##*/}-arm64.test" "./$dir"
done

quiet() { grep -v "TCG doesn't support requested feature" || true; }

# go_tests LABEL EXPECTED ARCH RUNNER...: the Go test binaries of GO_PACKAGES for ARCH under RUNNER, each from its
# package folder (its testdata); the kernels' summary line (their binary runs last) names the set in use. A test
# that starts its binary again does so under the same RUNNER (GOMERGE_TEST_EXEC).
go_tests() {
	local label=$1 expect=$2 arch=$3 dir pkg
	shift 3
	echo "== Go tests, $label (expecting the $expect kernels)"
	for dir in "${GO_PACKAGES[@]}"; do
		pkg=${dir##*/}
		(cd "$dir" && GOMERGE_EXPECT_KERNELS=$expect GOMERGE_TEST_EXEC="$*" "$@" "$BIN/$pkg-$arch.test" -test.count=1 2>&1) |
			quiet | tail -n 2 |
			tee "$BIN/last.log"
		grep -q '^PASS$' "$BIN/last.log" || { echo "cpus.sh: Go tests of package $pkg failed ($label)"; exit 1; }
	done
	grep -q '^kernels: ' "$BIN/last.log" || { echo "cpus.sh: no kernel summary from the kernels' tests ($label)"; exit 1; }
	grep -q "in use $expect;" "$BIN/last.log" || { echo "cpus.sh: kernels other than $expect in use ($label)"; exit 1; }
}

# quickstart LABEL EXPECTED RUNNER...: examples/quickstart.py through the extension
quickstart() {
	local label=$1 expect=$2
	shift 2
	echo "== examples/quickstart.py, $label (expecting the $expect kernels)"
	PYTHONPATH=python GOMERGE_EXPECT_KERNELS=$expect "$@" "$PY" examples/quickstart.py 2>&1 | quiet | tee "$BIN/last.log"
	grep -q "kernels $expect)" "$BIN/last.log" || { echo "cpus.sh: quickstart did not run the $expect kernels ($label)"; exit 1; }
	grep -q "^  ties   -> " "$BIN/last.log" || { echo "cpus.sh: quickstart failed ($label)"; exit 1; }
}

# refused LABEL SET RUNNER...: forcing a set this CPU lacks is a clear error, not SIGILL
refused() {
	local label=$1 set=$2
	shift 2
	echo "== GOMERGE_KERNELS=$set, $label: a clear error"
	local rc=0
	PYTHONPATH=python GOMERGE_KERNELS=$set "$@" "$PY" examples/quickstart.py >"$BIN/last.log" 2>&1 || rc=$?
	quiet <"$BIN/last.log" | tail -n 1
	[[ $rc == 1 ]] && grep -q "ValueError: GOMERGE_KERNELS=$set: this CPU lacks" "$BIN/last.log" ||
		{ echo "cpus.sh: expected a ValueError naming the missing features, got exit status $rc ($label)"; exit 1; }
}

go_tests "native ($(uname -m))" "$native" amd64 env
go_tests "qemu -cpu Nehalem" go amd64 "$QEMU/qemu-x86_64-static" -cpu Nehalem
go_tests "qemu -cpu Haswell" avx2 amd64 "$QEMU/qemu-x86_64-static" -cpu Haswell
go_tests "qemu-aarch64 (GOARCH=arm64)" go arm64 "$QEMU/qemu-aarch64-static"

quickstart "native ($(uname -m))" "$native" env
quickstart "qemu -cpu Nehalem" go "$QEMU/qemu-x86_64-static" -cpu Nehalem
quickstart "qemu -cpu Haswell" avx2 "$QEMU/qemu-x86_64-static" -cpu Haswell
refused "qemu -cpu Nehalem" avx2 "$QEMU/qemu-x86_64-static" -cpu Nehalem
refused "qemu -cpu Haswell" avx512 "$QEMU/qemu-x86_64-static" -cpu Haswell

echo "cpus.sh: every CPU level passed (native: $native kernels; emulated: go on Nehalem, avx2 on Haswell, go on arm64)"

// Command floor measures, on this machine and for one scenario's files, the
// least time any disk-to-disk merge needs: reading the inputs from the page
// cache, writing an output of the given size, and a skeleton merge that does
// both around the cheapest possible combination (one weighted sum of the
// inputs' bytes seen as float32, streamed in chunks on all cores), with and
// without the fsync that makes the output durable before it is published
// (as gomerge does). It is a
// lower bound for every method, ties included: a real merge reads the same
// bytes, writes the same bytes and computes at least this much.
//
// Usage: go run ./benchmarks/floor -out BYTES -runs N FILE...
// It prints one JSON object, the best time of N runs for each measurement.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const chunk = 1 << 20 // bytes of each input per step of the skeleton merge

func main() {
	outBytes := flag.Int64("out", 0, "bytes of the output")
	runs := flag.Int("runs", 5, "runs; the best is reported")
	flag.Parse()
	files := flag.Args()
	if len(files) == 0 || *outBytes <= 0 {
		fmt.Fprintln(os.Stderr, "usage: floor -out BYTES [-runs N] FILE...")
		os.Exit(2)
	}
	dir, err := os.MkdirTemp("", "gomerge-floor-")
	check(err)
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "out.safetensors")

	var inBytes int64
	bufs := make([][]byte, len(files))
	for i, f := range files {
		st, err := os.Stat(f)
		check(err)
		inBytes += st.Size()
		bufs[i] = make([]byte, st.Size())
	}
	outBuf := make([]byte, *outBytes)
	res := map[string]float64{"read_bytes": float64(inBytes), "written_bytes": float64(*outBytes)}
	measure := func(key string, fn func()) {
		best := math.Inf(1)
		for r := 0; r < *runs; r++ {
			os.Remove(out)
			t0 := time.Now()
			fn()
			best = min(best, time.Since(t0).Seconds())
		}
		res[key] = best
	}
	measure("read_s", func() { readAll(files, bufs) })
	measure("write_s", func() { writeFile(out, outBuf, false) })
	measure("write_fsync_s", func() { writeFile(out, outBuf, true) })
	measure("skeleton_s", func() { skeleton(files, out, *outBytes, false) })
	measure("skeleton_fsync_s", func() { skeleton(files, out, *outBytes, true) })
	check(json.NewEncoder(os.Stdout).Encode(res))
}

// readAll reads every file whole, one goroutine per file.
func readAll(files []string, bufs [][]byte) {
	var wg sync.WaitGroup
	for i, f := range files {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fh, err := os.Open(f)
			check(err)
			_, err = fh.ReadAt(bufs[i], 0)
			check(err)
			check(fh.Close())
		}()
	}
	wg.Wait()
}

func writeFile(path string, data []byte, sync bool) {
	fh, err := os.Create(path)
	check(err)
	_, err = fh.Write(data)
	check(err)
	if sync {
		check(fh.Sync())
	}
	check(fh.Close())
}

// skeleton streams the inputs in chunks on all cores, writes the sum of the
// inputs' float32 views (weights 1) into the output and closes it, with
// fsync or without: the least work of a disk-to-disk merge.
func skeleton(files []string, out string, outBytes int64, fsync bool) {
	ins := make([]*os.File, len(files))
	sizes := make([]int64, len(files))
	for i, f := range files {
		fh, err := os.Open(f)
		check(err)
		st, err := fh.Stat()
		check(err)
		ins[i], sizes[i] = fh, st.Size()
	}
	fo, err := os.Create(out)
	check(err)
	check(fo.Truncate(outBytes))
	steps := (outBytes + chunk - 1) / chunk
	var next sync.Mutex
	step := int64(0)
	var wg sync.WaitGroup
	for w := 0; w < runtime.GOMAXPROCS(0); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := make([]byte, chunk)
			sum := make([]byte, chunk)
			for {
				next.Lock()
				s := step
				step++
				next.Unlock()
				if s >= steps {
					return
				}
				clear(sum)
				acc := asFloat32(sum)
				for i, fh := range ins {
					// each input's share of this step (inputs are read whole, in proportion to the output)
					per := (sizes[i] + steps - 1) / steps
					for off := int64(0); off < per; off += chunk {
						n, _ := fh.ReadAt(in[:min(per-off, chunk)], s*per+off)
						for j, v := range asFloat32(in[:n&^3]) {
							acc[j] += v
						}
					}
				}
				n := min(chunk, outBytes-s*chunk)
				_, err := fo.WriteAt(sum[:n], s*chunk)
				check(err)
				if fsync { // start writing to disk at once, as gomerge does, so that the final fsync is short
					check(unix.SyncFileRange(int(fo.Fd()), s*chunk, n, unix.SYNC_FILE_RANGE_WRITE))
				}
			}
		}()
	}
	wg.Wait()
	if fsync {
		check(fo.Sync())
	}
	check(fo.Close())
	for _, fh := range ins {
		check(fh.Close())
	}
}

func asFloat32(b []byte) []float32 {
	if len(b) < 4 {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4)
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "floor:", err)
		os.Exit(1)
	}
}

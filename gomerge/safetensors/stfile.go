package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"sync/atomic"

	stlib "github.com/nlpodyssey/safetensors"
	"golang.org/x/sys/unix"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/kernels"
)

// MaxHeaderSize caps a safetensors header, as the reference implementation
// does (100 MB): a larger claim is refused before anything is allocated.
const MaxHeaderSize = 100_000_000

// File is an open safetensors file whose header has been read and
// validated; tensor data is read on demand, so that a merge holds only the
// modules it is working on, never whole files.
type File struct {
	Path      string
	f         *os.File
	dataStart int64
	Entries   map[string]Entry
	Metadata  map[string]string
	// AllowNonFinite lets NaN and Inf values through; by default reading one is an error.
	AllowNonFinite bool
}

// Entry locates one tensor of a File.
type Entry struct {
	DType    DType  // "" for dtypes gomerge does not merge
	RawDType string // as written in the file
	Shape    []int
	Offset   int64 // from the start of the data section
	Length   int64
}

// Open opens and validates a safetensors file: header length
// within the cap and the file, a JSON header without duplicate names,
// offsets that tile the data section exactly, and byte counts that match
// every dtype and shape. The data itself is not read.
func Open(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, errs.IO(path, err)
	}
	st, err := readHeader(path, f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return st, nil
}

func readHeader(path string, f *os.File) (*File, error) {
	info, err := f.Stat()
	if err != nil {
		return nil, errs.IO(path, err)
	}
	size := info.Size()
	bad := func(format string, args ...any) error {
		return errs.Value("%s: not a valid safetensors file: %s", path, fmt.Sprintf(format, args...))
	}
	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:]); err != nil {
		return nil, bad("shorter than its 8-byte header length (%d bytes)", size)
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize {
		return nil, bad("header length %d is above the format's cap of %d", n, MaxHeaderSize)
	}
	if int64(n) > size-8 {
		return nil, bad("header length %d is beyond the end of the file (%d bytes)", n, size)
	}
	header := make([]byte, n)
	if _, err := io.ReadFull(f, header); err != nil {
		return nil, errs.IO(path, err)
	}
	tensors, metadata, err := parseHeader(header)
	if err != nil {
		if e, ok := err.(unsupportedDType); ok {
			return nil, errs.Value("%s: tensor %s has dtype %s, which gomerge does not read (LoRA factors must be F32, BF16 or F16)", path, e.name, e.dtype)
		}
		return nil, bad("%v", err)
	}
	st := &File{Path: path, f: f, dataStart: int64(8 + n), Entries: make(map[string]Entry, len(tensors)), Metadata: metadata}
	type span struct {
		name       string
		start, end uint64
	}
	spans := make([]span, 0, len(tensors))
	for _, ti := range tensors {
		name := ti.name
		shape := make([]int, len(ti.Shape))
		elems := uint64(1)
		for i, d := range ti.Shape {
			if d > 1<<40 || (elems != 0 && elems*d/elems != d) {
				return nil, bad("tensor %s: shape %v overflows", name, ti.Shape)
			}
			elems *= d
			shape[i] = int(d)
		}
		s, e := ti.DataOffsets[0], ti.DataOffsets[1]
		if e < s || elems > (1<<62)/ti.size || e-s != elems*ti.size {
			return nil, bad("tensor %s: dtype %s and shape %v need %d bytes, its offsets [%d, %d] give %d",
				name, ti.rawName, ti.Shape, elems*ti.size, s, e, e-s)
		}
		spans = append(spans, span{name, s, e})
		st.Entries[name] = Entry{DType: ti.floatType, RawDType: ti.rawName, Shape: shape,
			Offset: int64(s), Length: int64(e - s)}
	}
	sort.Slice(spans, func(i, j int) bool {
		if spans[i].start != spans[j].start {
			return spans[i].start < spans[j].start
		}
		return spans[i].end < spans[j].end
	})
	pos := uint64(0)
	for _, sp := range spans {
		if sp.start != pos {
			kind := "overlaps another tensor"
			if sp.start > pos {
				kind = "leaves a gap before it"
			}
			return nil, bad("tensor %s at offset %d %s", sp.name, sp.start, kind)
		}
		pos = sp.end
	}
	if int64(pos) != size-st.dataStart {
		return nil, bad("its tensors need %d bytes of data, the file holds %d", pos, size-st.dataStart)
	}
	return st, nil
}

type unsupportedDType struct{ name, dtype string }

func (e unsupportedDType) Error() string { return "tensor " + e.name + " has dtype " + e.dtype }

// headerTensor is one tensor's entry in a safetensors header.
type headerTensor struct {
	name        string
	rawName     string   // the dtype as written
	size        uint64   // bytes per element
	floatType   DType    // "" for dtypes gomerge does not merge
	DType       *string  `json:"dtype"`
	Shape       []uint64 `json:"shape"`
	DataOffsets []uint64 `json:"data_offsets"`
}

// parseHeader reads a safetensors header in one pass: each tensor's dtype,
// shape and offsets, and the string metadata. It rejects what encoding/json
// would let through silently (a name given twice: the last would win), a
// tensor entry without its three fields, and dtypes that cannot be read
// (the dtype names are the safetensors library's, and the FP8 ones,
// F8_E4M3 and F8_E5M2, which it does not know).
func parseHeader(header []byte) (tensors []headerTensor, metadata map[string]string, err error) {
	dec := json.NewDecoder(bytes.NewReader(header))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, fmt.Errorf("header is not a JSON object")
	}
	seen := map[string]bool{}
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil, nil, fmt.Errorf("header: %v", err)
		}
		key, _ := kt.(string)
		if seen[key] {
			return nil, nil, fmt.Errorf("tensor %s appears twice in the header", key)
		}
		seen[key] = true
		if key == "__metadata__" {
			if err := dec.Decode(&metadata); err != nil {
				return nil, nil, fmt.Errorf("header: __metadata__: %v", err)
			}
			continue
		}
		t := headerTensor{name: key}
		if err := dec.Decode(&t); err != nil {
			return nil, nil, fmt.Errorf("header: tensor %s: %v", key, err)
		}
		if t.DType == nil || t.Shape == nil || len(t.DataOffsets) != 2 {
			return nil, nil, fmt.Errorf("header: tensor %s needs dtype, shape and two data_offsets", key)
		}
		size, ok := RawDTypeSize(*t.DType)
		if !ok {
			return nil, nil, unsupportedDType{key, *t.DType}
		}
		t.rawName, t.size = *t.DType, uint64(size)
		if d, err := stlib.ParseDType(*t.DType); err == nil {
			t.floatType = stDTypes[d]
		}
		tensors = append(tensors, t)
	}
	if _, err := dec.Token(); err != nil {
		return nil, nil, fmt.Errorf("header: %v", err)
	}
	if dec.More() || dec.InputOffset() < int64(len(bytes.TrimRight(header, " \t\r\n"))) {
		return nil, nil, fmt.Errorf("header: data after the JSON object")
	}
	return tensors, metadata, nil
}

// ReadFloat32 reads tensor name and converts it to float32.
func (s *File) ReadFloat32(name string) ([]float32, error) {
	e, ok := s.Entries[name]
	if !ok {
		return nil, errs.Value("%s: no tensor %s", s.Path, name)
	}
	return s.ReadFloat32Into(make([]float32, int(e.Length)/max(1, e.DType.Size())), name)
}

// ReadFloat32Into reads tensor name into out (of its number of elements),
// converting it to float32.
func (s *File) ReadFloat32Into(out []float32, name string) ([]float32, error) {
	e, ok := s.Entries[name]
	if !ok {
		return nil, errs.Value("%s: no tensor %s", s.Path, name)
	}
	n := int(e.Length) / e.DType.Size()
	out = out[:n]
	if e.DType == F32 {
		if n > 0 {
			if err := s.readAt(Float32AsBytes(out), e.Offset, name); err != nil {
				return nil, err
			}
		}
		return out, s.checkFinite(out, name)
	}
	buf := pool.Get(int(e.Length+3) / 4)
	defer pool.Put(buf)
	raw := Float32AsBytes(buf)[:e.Length]
	if err := s.readAt(raw, e.Offset, name); err != nil {
		return nil, err
	}
	decodeInto(out, e.DType, raw)
	return out, s.checkFinite(out, name)
}

// ReadFloat32Run reads two float32 tensors stored one after the other from off,
// first then second, into out (the first's na elements, then the second's).
func (s *File) ReadFloat32Run(out []float32, off int64, na int, first, second string) error {
	if len(out) > 0 {
		if err := s.readAt(Float32AsBytes(out), off, first); err != nil {
			return err
		}
	}
	if err := s.checkFinite(out[:na], first); err != nil {
		return err
	}
	return s.checkFinite(out[na:], second)
}

func (s *File) checkFinite(x []float32, name string) error {
	if s.AllowNonFinite || kernels.MaxAbsBits(x) < kernels.NonFiniteBits {
		return nil
	}
	for i, v := range x {
		if math.Float32bits(v)&0x7f800000 == 0x7f800000 {
			return errs.Value("%s: tensor %s holds %v at index %d (pass allow_nonfinite=True to merge it anyway)", s.Path, name, v, i)
		}
	}
	return nil
}

func (s *File) readAt(dst []byte, off int64, name string) error {
	if _, err := s.f.ReadAt(dst, s.dataStart+off); err != nil {
		return errs.New(errs.KindOS, "%s: reading tensor %s: %v (was the file changed during the merge?)", s.Path, name, err)
	}
	return nil
}

// Close closes the file.
func (s *File) Close() error { return s.f.Close() }

// OutTensor is a tensor of a file written by Writer.
type OutTensor struct {
	Name  string
	DType DType
	Shape []int
	// RawDType is the dtype as written in a file (I64, BOOL, ...) of a
	// tensor copied as it is, for dtypes that have no DType (DType "").
	RawDType string
}

// dtypeName is the tensor's dtype in the header.
func (t OutTensor) dtypeName() string {
	if t.DType == "" {
		return t.RawDType
	}
	return writeDTypes[t.DType]
}

// byteLen is the tensor's size in bytes.
func (t OutTensor) byteLen() int64 {
	if t.DType == "" {
		n, _ := RawDTypeSize(t.RawDType)
		return int64(Numel(t.Shape) * n)
	}
	return int64(Numel(t.Shape) * t.DType.Size())
}

// RawDTypeSize is the element size of a dtype as named in safetensors
// headers (F32, I64, BOOL, ...); false for a name the format does not know.
func RawDTypeSize(raw string) (int, bool) {
	if n, ok := fp8DTypes[raw]; ok {
		return n, true
	}
	d, err := stlib.ParseDType(raw)
	if err != nil {
		return 0, false
	}
	return int(d.Size()), true
}

// fp8DTypes are the one-byte float dtypes of safetensors that the
// reference Go library does not list: read as raw bytes, decoded by
// package quant.
var fp8DTypes = map[string]int{"F8_E4M3": 1, "F8_E5M2": 1}

// ReadRaw reads the stored bytes of tensor name, whatever its dtype, into
// dst (grown when too small) and returns them.
func (s *File) ReadRaw(name string, dst []byte) ([]byte, error) {
	e, ok := s.Entries[name]
	if !ok {
		return nil, errs.Value("%s: no tensor %s", s.Path, name)
	}
	if int64(cap(dst)) < e.Length {
		dst = make([]byte, e.Length)
	}
	dst = dst[:e.Length]
	if e.Length > 0 {
		if err := s.readAt(dst, e.Offset, name); err != nil {
			return nil, err
		}
	}
	return dst, nil
}

// Writer writes a safetensors file whose tensors are all known in advance
// (names, dtypes, shapes) and arrive in any order, from any goroutine: the
// header is written first, each tensor at its offset as it comes.
type Writer struct {
	path     string
	f        *os.File
	start    int64
	offsets  map[string][2]int64
	fd       int
	unsynced atomic.Int64 // bytes written since the write-back last started
}

var writeDTypes = map[DType]string{F32: "F32", BF16: "BF16", F16: "F16"}

// Create creates path with a header for the given tensors and
// metadata (data sorted by name, the header padded to 8 bytes).
func Create(path string, tensors []OutTensor, metadata map[string]string) (*Writer, error) {
	sorted := append([]OutTensor(nil), tensors...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	// The JSON header is written directly (json.Marshal of nested maps took a millisecond of a small merge),
	// with the keys in json.Marshal's order: sorted, "__metadata__" among them.
	w := &Writer{path: path, offsets: make(map[string][2]int64, len(sorted))}
	var hb bytes.Buffer
	hb.WriteByte('{')
	key := func(k string) {
		if hb.Len() > 1 {
			hb.WriteByte(',')
		}
		q, _ := json.Marshal(k)
		hb.Write(q)
		hb.WriteByte(':')
	}
	meta := func() {
		if len(metadata) > 0 {
			key("__metadata__")
			m, _ := json.Marshal(metadata)
			hb.Write(m)
		}
	}
	pos := int64(0)
	metaDone := false
	for _, t := range sorted {
		if !metaDone && t.Name > "__metadata__" {
			meta()
			metaDone = true
		}
		n := t.byteLen()
		key(t.Name)
		fmt.Fprintf(&hb, `{"data_offsets":[%d,%d],"dtype":%q,"shape":[`, pos, pos+n, t.dtypeName())
		for i, d := range t.Shape {
			if i > 0 {
				hb.WriteByte(',')
			}
			hb.WriteString(strconv.Itoa(d))
		}
		hb.WriteString("]}")
		w.offsets[t.Name] = [2]int64{pos, pos + n}
		pos += n
	}
	if !metaDone {
		meta()
	}
	hb.WriteByte('}')
	h := hb.Bytes()
	for len(h)%8 != 0 {
		h = append(h, ' ')
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, errs.IO(path, err)
	}
	w.f, w.fd = f, int(f.Fd())
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(h)))
	if _, err := f.Write(append(lenBuf[:], h...)); err != nil {
		f.Close()
		return nil, errs.IO(path, err)
	}
	w.start = int64(8 + len(h))
	if err := allocate(f, w.fd, w.start+pos); err != nil {
		f.Close()
		return nil, errs.IO(path, err)
	}
	return w, nil
}

// allocate sets the file's size, reserving its blocks when the file system
// can (a full disk fails here, before any tensor is written, and later
// writes skip the per-page block reservation).
func allocate(f *os.File, fd int, size int64) error {
	if size > 0 {
		err := unix.Fallocate(fd, 0, 0, size)
		if err == nil || !(errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)) {
			return err
		}
	}
	return f.Truncate(size)
}

// WriteTensor writes the encoded data of one tensor at its place.
func (w *Writer) WriteTensor(name string, data []byte) error {
	off, ok := w.offsets[name]
	if !ok || int64(len(data)) != off[1]-off[0] {
		return errs.New(errs.KindInternal, "%s: tensor %s: unexpected name or size (%d bytes)", w.path, name, len(data))
	}
	if _, err := w.f.WriteAt(data, w.start+off[0]); err != nil {
		return errs.IO(w.path, err)
	}
	w.kick(len(data))
	return nil
}

// WriteTensorPart writes encoded bytes of tensor name from byte off of the
// tensor, so that a large tensor can be encoded and written a chunk at a
// time; the parts must cover the tensor.
func (w *Writer) WriteTensorPart(name string, off int64, data []byte) error {
	o, ok := w.offsets[name]
	if !ok || off < 0 || off+int64(len(data)) > o[1]-o[0] {
		return errs.New(errs.KindInternal, "%s: tensor %s: part [%d, %d) outside the tensor", w.path, name, off, off+int64(len(data)))
	}
	if _, err := w.f.WriteAt(data, w.start+o[0]+off); err != nil {
		return errs.IO(w.path, err)
	}
	w.kick(len(data))
	return nil
}

// kick starts writing the file to disk every few MiB, while the merge goes
// on, so that the final fsync is short.
func (w *Writer) kick(written int) {
	if w.unsynced.Add(int64(written)) >= writebackEvery {
		w.unsynced.Store(0)
		_ = unix.SyncFileRange(w.fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
}

// WritePair writes two tensors, with one system call when they are
// stored one after the other (as a module's A and B are: sorted by name).
func (w *Writer) WritePair(first string, a []byte, second string, b []byte) error {
	oa, ok1 := w.offsets[first]
	ob, ok2 := w.offsets[second]
	if !ok1 || !ok2 || oa[1] != ob[0] || int64(len(a)) != oa[1]-oa[0] || int64(len(b)) != ob[1]-ob[0] || len(a) == 0 || len(b) == 0 {
		if err := w.WriteTensor(first, a); err != nil {
			return err
		}
		return w.WriteTensor(second, b)
	}
	off, iov := w.start+oa[0], [][]byte{a, b}
	for len(iov) > 0 {
		n, err := unix.Pwritev(w.fd, iov, off)
		if err == nil && n == 0 {
			err = io.ErrShortWrite // no progress: never loop on it
		}
		if err != nil {
			return errs.IO(w.path, err)
		}
		off += int64(n)
		for len(iov) > 0 && n >= len(iov[0]) {
			n -= len(iov[0])
			iov = iov[1:]
		}
		if len(iov) > 0 {
			iov[0] = iov[0][n:]
		}
	}
	w.kick(len(a) + len(b))
	return nil
}

// writebackEvery is how many bytes Writer writes between two starts of
// the write-back.
const writebackEvery = 4 << 20

// Close syncs and closes the file.
func (w *Writer) Close() error { return errs.SyncClose(w.f, w.path, nil) }

// Command gen512 writes kernels_avx512_gen.go, the AVX-512 (16-lane)
// versions of the kernels in kernels_avx2.go (8 lanes, AVX2), which are the
// same code at another width, and likewise fuse_avx512_gen.go from
// fuse_avx2.go (the fuse kernel, in a file of its own: see pairs). It is run by go generate in package kernels
// (the directive is in doc.go); with -check it only reports whether the
// file on disk is what it would write (the Makefile's lint target).
//
// The rewrite works on the syntax tree, never on the digits of the text:
//
//   - the names declared at the top of kernels_avx2.go are renamed wherever
//     they are used: fooAVX2 becomes foo512, any other name gets 16
//     appended (vecs: vecs16, group: group16);
//   - the lane count is the constant lanesAVX2, whose value is doubled (its
//     uses, such as [lanesAVX2]float32 or &^ (lanesAVX2 - 1), follow it);
//   - the names of archsimd's vector types, and of the functions and
//     methods that name them (Float32x8, BroadcastInt32x8, AsUint32x8, ...),
//     get twice as many lanes (Float32x16, BroadcastInt32x16, AsUint32x16);
//   - in comments, the word AVX2 becomes AVX-512, and archsimd's names and
//     the declared names ending in AVX2 are renamed as in the code; the
//     other declared names (which may be ordinary words, such as group or
//     pruned) only as the first word of their doc comment or in a doc link
//     ([vecs]).
//
// It refuses what it cannot rewrite safely: an integer literal 7 or 8 (a
// lane count or lane mask not written with lanesAVX2), a name ending in 8
// that no rule renames (bits.OnesCount8, uint8: code that depends on the
// width otherwise), and a local name, parameter or field that is also a
// name declared at the top (it would be renamed with it).
package main

import (
	"bytes"
	"flag"
	"fmt"
	"go/ast"
	"go/format"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

const (
	// source holds the kernels written once, at 8 lanes.
	source = "kernels_avx2.go"
	// target is the file written, at 16 lanes.
	target = "kernels_avx512_gen.go"
	// lanesConst is the lane count's constant in source.
	lanesConst = "lanesAVX2"
)

// pairs are the files written once at 8 lanes and the files generated from
// them at 16: source (which declares lanesConst) first, then the kernels
// that live in files of their own (fuse_avx2.go: the fuse kernel). The names
// declared at the top of any of them are renamed in all of them.
var pairs = [][2]string{
	{source, target},
	{"fuse_avx2.go", "fuse_avx512_gen.go"},
}

func main() {
	dir := flag.String("dir", ".", "the directory of package kernels")
	check := flag.Bool("check", false, "only check that "+target+" is up to date (exit status 1 if not)")
	flag.Parse()
	if err := run(*dir, *check); err != nil {
		fmt.Fprintln(os.Stderr, "gen512:", err)
		os.Exit(1)
	}
}

func run(dir string, check bool) error {
	srcs := make([][]byte, len(pairs))
	for i, p := range pairs {
		var err error
		if srcs[i], err = os.ReadFile(filepath.Join(dir, p[0])); err != nil {
			return err
		}
	}
	for i, p := range pairs {
		// the names declared at the top of the other sources
		elsewhere := map[string]bool{}
		for j, q := range pairs {
			if j == i {
				continue
			}
			names, err := topNames(q[0], srcs[j])
			if err != nil {
				return err
			}
			for n := range names {
				elsewhere[n] = true
			}
		}
		out, err := generateFrom(p[0], srcs[i], elsewhere)
		if err != nil {
			return err
		}
		path := filepath.Join(dir, p[1])
		if check {
			old, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if !bytes.Equal(old, out) {
				return fmt.Errorf("%s is not what %s generates: run go generate ./gomerge/kernels", path, p[0])
			}
			continue
		}
		if err := os.WriteFile(path, out, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// topNames returns the names declared at the top of the Go source src.
func topNames(name string, src []byte) (map[string]bool, error) {
	file, err := parser.ParseFile(token.NewFileSet(), name, src, parser.SkipObjectResolution)
	if err != nil {
		return nil, err
	}
	names := map[string]bool{}
	for _, d := range file.Decls {
		switch d := d.(type) {
		case *ast.FuncDecl:
			names[d.Name.Name] = true
		case *ast.GenDecl:
			for _, s := range d.Specs {
				switch s := s.(type) {
				case *ast.TypeSpec:
					names[s.Name.Name] = true
				case *ast.ValueSpec:
					for _, n := range s.Names {
						names[n.Name] = true
					}
				}
			}
		}
	}
	return names, nil
}

// vectorName matches archsimd's names with a lane count: the vector types
// (Float32x8, Mask32x8, Uint16x8) and the functions and methods named after
// them (LoadFloat32x8, BroadcastInt32x8, AsUint32x8).
var vectorName = regexp.MustCompile(`^(\w*(?:Int|Uint|Float|Mask)(?:8|16|32|64)x)([0-9]+)$`)

// wider returns name (declared in source, or archsimd's) at twice the lanes,
// and whether it is one to rename.
func wider(name string, declared map[string]bool) (string, bool) {
	switch {
	case declared[name] && strings.HasSuffix(name, "AVX2"):
		return strings.TrimSuffix(name, "AVX2") + "512", true
	case declared[name]:
		return name + "16", true
	}
	if m := vectorName.FindStringSubmatch(name); m != nil {
		n, _ := strconv.Atoi(m[2])
		return m[1] + strconv.Itoa(2*n), true
	}
	return name, false
}

// edit replaces src[from:to] with text.
type edit struct {
	from, to int
	text     string
}

// generate returns the 16-lane file for the 8-lane source src (of
// kernels_avx2.go).
func generate(src []byte) ([]byte, error) { return generateFrom(source, src, nil) }

// generateFrom returns the 16-lane file for the 8-lane source src of the
// file named source; elsewhere are the names declared at the top of the
// other sources (renamed here too; one of them may be lanesConst).
func generateFrom(source string, src []byte, elsewhere map[string]bool) ([]byte, error) {
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, source, src, parser.ParseComments|parser.SkipObjectResolution)
	if err != nil {
		return nil, err
	}
	off := func(p token.Pos) int { return fset.Position(p).Offset }
	where := func(n ast.Node) string { return fset.Position(n.Pos()).String() }

	// the names declared at the top, and the identifiers that declare them
	declared := map[string]bool{}
	topIdents := map[*ast.Ident]bool{}
	var imports *ast.GenDecl
	var lanesValue *ast.BasicLit
	for _, d := range file.Decls {
		switch d := d.(type) {
		case *ast.FuncDecl:
			if d.Recv != nil {
				return nil, fmt.Errorf("%s: method %s: the generator renames functions, not methods", where(d), d.Name.Name)
			}
			declared[d.Name.Name], topIdents[d.Name] = true, true
		case *ast.GenDecl:
			if d.Tok == token.IMPORT {
				imports = d
				continue
			}
			for _, s := range d.Specs {
				switch s := s.(type) {
				case *ast.TypeSpec:
					declared[s.Name.Name], topIdents[s.Name] = true, true
				case *ast.ValueSpec:
					for i, n := range s.Names {
						declared[n.Name], topIdents[n] = true, true
						if n.Name == lanesConst && d.Tok == token.CONST && i < len(s.Values) {
							lanesValue, _ = s.Values[i].(*ast.BasicLit)
						}
					}
				}
			}
		}
	}
	if (lanesValue == nil || lanesValue.Kind != token.INT) && !(elsewhere[lanesConst] && !declared[lanesConst]) {
		return nil, fmt.Errorf("%s declares no constant %s = <integer>", source, lanesConst)
	}
	for n := range elsewhere {
		if declared[n] {
			return nil, fmt.Errorf("%s declares %s, which another source declares too", source, n)
		}
		declared[n] = true
	}
	if imports == nil {
		return nil, fmt.Errorf("%s imports nothing (it needs simd/archsimd)", source)
	}

	// the identifiers that declare a local name, a parameter or a field
	var locals []*ast.Ident
	selectors := map[*ast.Ident]bool{}
	ast.Inspect(file, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.SelectorExpr:
			selectors[n.Sel] = true
		case *ast.Field:
			locals = append(locals, n.Names...)
		case *ast.ValueSpec:
			locals = append(locals, n.Names...)
		case *ast.TypeSpec:
			locals = append(locals, n.Name)
		case *ast.AssignStmt:
			if n.Tok == token.DEFINE {
				for _, e := range n.Lhs {
					if id, ok := e.(*ast.Ident); ok {
						locals = append(locals, id)
					}
				}
			}
		case *ast.RangeStmt:
			if n.Tok == token.DEFINE {
				for _, e := range []ast.Expr{n.Key, n.Value} {
					if id, ok := e.(*ast.Ident); ok {
						locals = append(locals, id)
					}
				}
			}
		case *ast.LabeledStmt:
			locals = append(locals, n.Label)
		}
		return true
	})
	for _, id := range locals {
		if !topIdents[id] && declared[id.Name] {
			return nil, fmt.Errorf("%s: %s is declared at the top of %s and again here: rename this one", where(id), id.Name, source)
		}
	}

	// the edits of the code
	var edits []edit
	var errs []string
	ast.Inspect(file, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.ImportSpec:
			return false
		case *ast.Ident:
			name, ok := wider(n.Name, declared)
			if ok && selectors[n] && declared[n.Name] {
				errs = append(errs, fmt.Sprintf("%s: field or method %s has the name of a declaration of %s", where(n), n.Name, source))
			}
			if ok {
				edits = append(edits, edit{off(n.Pos()), off(n.End()), name})
			} else if strings.HasSuffix(n.Name, "8") {
				errs = append(errs, fmt.Sprintf("%s: %s depends on the width (8) in a way the generator does not rewrite: "+
					"write the kernel by hand in kernels_simd.go and kernels_avx512.go", where(n), n.Name))
			}
		case *ast.BasicLit:
			if n.Kind != token.INT {
				break
			}
			v, err := strconv.ParseUint(strings.ReplaceAll(n.Value, "_", ""), 0, 64)
			switch {
			case err != nil:
				errs = append(errs, fmt.Sprintf("%s: %s: %v", where(n), n.Value, err))
			case n == lanesValue:
				edits = append(edits, edit{off(n.Pos()), off(n.End()), strconv.FormatUint(2*v, 10)})
			case v == 7 || v == 8:
				errs = append(errs, fmt.Sprintf("%s: the literal %s: write a lane count or lane mask with %s "+
					"(lanesAVX2, lanesAVX2 - 1)", where(n), n.Value, lanesConst))
			}
		}
		return true
	})
	if len(errs) > 0 {
		return nil, fmt.Errorf("%s", strings.Join(errs, "\n"))
	}

	// the edits of the comments: the word AVX2, archsimd's names and the
	// declared names ending in AVX2 everywhere; the other declared names
	// (ordinary words, such as group and pruned) as the first word of their
	// doc comment or in a doc link ([vecs])
	docs := map[*ast.CommentGroup]bool{}
	for _, d := range file.Decls {
		switch d := d.(type) {
		case *ast.FuncDecl:
			docs[d.Doc] = true
		case *ast.GenDecl:
			docs[d.Doc] = true
			for _, s := range d.Specs {
				switch s := s.(type) {
				case *ast.TypeSpec:
					docs[s.Doc] = true
				case *ast.ValueSpec:
					docs[s.Doc] = true
				}
			}
		}
	}
	for _, g := range file.Comments {
		for i, c := range g.List {
			if text := commentAt16(c.Text, declared, docs[g] && i == 0); text != c.Text {
				edits = append(edits, edit{off(c.Pos()), off(c.End()), text})
			}
		}
	}
	slices.SortFunc(edits, func(a, b edit) int { return a.from - b.from })

	// the declarations (with their doc comments, and a comment ending their
	// last line) after the imports; comments between them are not copied
	var b bytes.Buffer
	fmt.Fprintf(&b, "// Code generated by gen512 from %s; DO NOT EDIT.\n\n", source)
	for _, c := range file.Comments {
		if c.Pos() < file.Package {
			for _, l := range c.List {
				if strings.HasPrefix(l.Text, "//go:build ") {
					fmt.Fprintf(&b, "%s\n\n", l.Text)
				}
			}
		}
	}
	fmt.Fprintf(&b, "package %s\n\n%s\n\n", file.Name.Name, src[off(imports.Pos()):off(imports.End())])
	fmt.Fprintf(&b, "// The kernels of %s at twice the lanes, for AVX-512: written by\n"+
		"// internal/gen512 (go generate); edit %s instead.\n", source, source)
	for _, d := range file.Decls {
		if d == ast.Decl(imports) {
			continue
		}
		from, to := off(d.Pos()), off(d.End())
		switch d := d.(type) {
		case *ast.FuncDecl:
			if d.Doc != nil {
				from = off(d.Doc.Pos())
			}
		case *ast.GenDecl:
			if d.Doc != nil {
				from = off(d.Doc.Pos())
			}
		}
		if nl := bytes.IndexByte(src[to:], '\n'); nl >= 0 {
			to += nl // the rest of the last line: a comment, if anything
		}
		b.WriteString("\n")
		for _, e := range edits {
			if e.from >= from && e.to <= to {
				b.Write(src[from:e.from])
				b.WriteString(e.text)
				from = e.to
			}
		}
		b.Write(src[from:to])
		b.WriteString("\n")
	}
	out, err := format.Source(b.Bytes())
	if err != nil {
		return nil, fmt.Errorf("the generated code does not parse: %v", err)
	}
	return out, nil
}

var word = regexp.MustCompile(`\w+`)

// commentAt16 returns the comment text with the word AVX2 replaced by
// AVX-512, and archsimd's names and the declared names renamed: those
// ending in AVX2 everywhere, the others only as the first word of a doc
// comment (doc) or in a doc link.
func commentAt16(text string, declared map[string]bool, doc bool) string {
	var b strings.Builder
	last := 0
	for k, m := range word.FindAllStringIndex(text, -1) {
		w := text[m[0]:m[1]]
		name, ok := wider(w, declared)
		link := m[0] > 0 && text[m[0]-1] == '[' && m[1] < len(text) && text[m[1]] == ']'
		switch {
		case w == "AVX2":
			name = "AVX-512"
		case !ok, declared[w] && !strings.HasSuffix(w, "AVX2") && !(doc && k == 0) && !link:
			continue
		}
		b.WriteString(text[last:m[0]])
		b.WriteString(name)
		last = m[1]
	}
	b.WriteString(text[last:])
	return b.String()
}

package gomerge

import (
	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/atomicdir"
)

// tmpPrefix starts the names of the temporary folders created beside the
// output directory (package atomicdir).
const tmpPrefix = atomicdir.TmpPrefix

// adapterKind is what an output adapter directory holds: overwrite replaces
// only a directory with an adapter_config.json (or an empty one).
var adapterKind = atomicdir.Kind{Marker: adapter.ConfigFile, What: "an adapter"}

// checkOutputDir refuses an existing output directory unless overwrite is
// set, and with overwrite refuses anything that is not a directory holding
// a PEFT adapter (or an empty directory), so that a mistyped path cannot
// replace unrelated data.
func checkOutputDir(dir string, overwrite bool) error {
	return atomicdir.Check(dir, overwrite, adapterKind)
}

// pendingDir is an output adapter directory being written (atomicdir.Pending).
type pendingDir struct{ *atomicdir.Pending }

// beginAdapterDir creates the temporary folder for dir.
func beginAdapterDir(dir string) (*pendingDir, error) {
	p, err := atomicdir.Begin(dir, adapterKind)
	if err != nil {
		return nil, err
	}
	return &pendingDir{p}, nil
}

func (p *pendingDir) path(name string) string { return p.Path(name) }

func (p *pendingDir) abort() { p.Abort() }

func (p *pendingDir) commit(overwrite bool) error { return p.Commit(overwrite) }

func writeFileSync(path string, data []byte) error { return atomicdir.WriteFileSync(path, data) }

// writeConfigAndCard writes adapter_config.json (with a rank pattern for
// modules whose rank differs) and, unless turned off, the README.md card.
func writeConfigAndCard(pending *pendingDir, opts Options, res *Result, base *adapter.Config, targets adapter.TargetModules, pattern adapter.Patterns) error {
	cfgJSON, err := adapter.MergedConfigJSON(base, res.Rank, targets, pattern, append(adapter.Patterns(nil), pattern...), nil)
	if err != nil {
		return err
	}
	if err := writeFileSync(pending.path(adapter.ConfigFile), cfgJSON); err != nil {
		return err
	}
	if opts.ModelCard != nil && !*opts.ModelCard {
		return nil
	}
	names := opts.SourceNames
	if len(names) != len(opts.Adapters) {
		names = opts.Adapters
	}
	return writeFileSync(pending.path("README.md"), []byte(ModelCard(opts, res, base.BaseModel, names)))
}

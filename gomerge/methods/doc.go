// Package methods holds the merge methods of gomerge: the method table
// (one row per method, which owns its merge function, parameters, memory
// estimate and rank rule), the parameter schema that every surface is
// built from, the combination arguments (Combine) and the per-module job
// that a merge runs for each output module (ModuleJob, Source, RunModule).
//
// It is organised one concept per file:
//
//   - methods.go: the method table (every merge method's family, pruning,
//     parameters, rank rule, merge function and memory estimate)
//   - params.go: the parameter schema (type, default, check and doc of each
//     argument) and args.go: Combine, the arguments it describes, validated
//     against the table and the schema
//   - job.go: the work for one output module and its merge by the method's row;
//     limits.go: each family's peak memory for one module
//   - sparsify.go, combine.go: PEFT's merge_utils primitives (magnitude and
//     random pruning, TIES, task arithmetic) on top of package kernels
//   - prune_outliers.go, prune_della.go, merge_generalized.go: mergekit's
//     Model Breadcrumbs and DELLA pruning and its generalized task arithmetic
//   - merge_factors.go, merge_cat.go, merge_svd.go, merge_dense_svd.go: one
//     file per merge family
//   - span.go, merge_iso.go, merge_tsv.go, merge_core.go, merge_knots.go: the
//     methods exact in the span of the factors (Iso-C, TSV-M, Core Space, KnOTS)
//
// It imports adapter, linalg, kernels, safetensors and errs, and nothing
// from the commands above it (package gomerge).
package methods

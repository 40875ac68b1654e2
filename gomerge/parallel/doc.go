// Package parallel runs the engine's work on all cores: For splits a loop
// into ranges, RunJobs runs independent jobs (modules, tensors) on a pool of
// workers counting them in a Progress that the bindings poll, and
// HoldGCHeadroom keeps Go's collector from running every few megabytes
// while a streaming job allocates steadily.
package parallel

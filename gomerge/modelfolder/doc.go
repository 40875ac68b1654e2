// Package modelfolder reads and writes Hugging Face model folders: a
// config.json, the weights in one model.safetensors or in shards listed by
// model.safetensors.index.json, and the other files that travel with a
// model (tokenizer, generation_config.json, chat template, ...).
//
// Open validates a folder before anything is read from it: shard names
// that leave the folder (../, absolute paths, symlinks resolving outside
// it), missing shards, a tensor in two shards and an index that disagrees
// with the shards' headers are clear errors (package errs), so that a
// hostile folder can make gomerge neither read nor write outside the
// folders it is given. Create writes an output folder atomically: shards
// and files go to a temporary folder beside it, which Commit renames into
// place, so that the folder appears complete or not at all.
//
// The package is organised one concept per file:
//
//   - folder.go: Open and the Folder it returns (tensors, shards, config)
//   - paths.go: where a folder's files may live (containment checks)
//   - layout.go: shard names and the split of tensors into shards
//   - output.go: the output folder (Create, shards, index, copies, Commit)
package modelfolder

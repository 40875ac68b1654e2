// Package card writes the README.md model cards of gomerge's outputs: the
// merged adapter, the fused model and the extracted adapter. A Card holds
// the Hugging Face Hub's YAML metadata (base_model, library_name, tags), a
// title and an introduction, and the sections each command fills: its
// sources, its parameters (from the method's parameter schema), the rank
// table and its own extra sections.
package card

package modelfolder

import "fmt"

// ShardName is the name transformers gives shard i (from 0) of n:
// model-00001-of-00003.safetensors; one shard is model.safetensors.
func ShardName(i, n int) string {
	if n == 1 {
		return SingleFile
	}
	return fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, n)
}

// Split cuts tensors (in the order given) into shards of at most maxBytes
// each, as transformers' save_pretrained(max_shard_size=...) does: a new
// shard starts when the next tensor would not fit, and a tensor larger
// than maxBytes gets a shard of its own. sizes gives each tensor's bytes.
// The shards are named with ShardName.
func Split(tensors []string, sizes map[string]int64, maxBytes int64) []Shard {
	var groups [][]string
	var cur []string
	var curBytes int64
	for _, name := range tensors {
		n := sizes[name]
		if len(cur) > 0 && curBytes+n > maxBytes {
			groups = append(groups, cur)
			cur, curBytes = nil, 0
		}
		cur = append(cur, name)
		curBytes += n
	}
	if len(cur) > 0 || len(groups) == 0 {
		groups = append(groups, cur)
	}
	out := make([]Shard, len(groups))
	for i, g := range groups {
		out[i] = Shard{Name: ShardName(i, len(groups)), Tensors: g}
	}
	return out
}

package card

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestCardString(t *testing.T) {
	c := &Card{BaseModel: "org/base: v1", Library: "peft", Tags: []string{"gomerge", "lora"}, Title: "T", Intro: "Intro."}
	s := c.Section("Sources")
	s.Table("adapter", "weight")
	s.Row("`a`", "1")
	c.Section("").Printf("Note: %s\n", "n")
	c.Section("Options").Lines([]string{"- a: 1", "- b: 2"})
	want := "---\nbase_model: \"org/base: v1\"\nlibrary_name: peft\ntags:\n- gomerge\n- lora\n---\n\n# T\n\nIntro.\n\n" +
		"## Sources\n\n| adapter | weight |\n|---|---|\n| `a` | 1 |\n\nNote: n\n\n## Options\n\n- a: 1\n- b: 2\n"
	assert.Equal(t, want, c.String())
	assert.NotContains(t, (&Card{Library: "peft"}).String(), "base_model")
}

func TestRankTable(t *testing.T) {
	c := &Card{}
	c.RankTable(8, map[string]int{"m.q": 8, "m.v": 8}, nil)
	assert.NotContains(t, c.String(), "## Ranks") // same ranks, no errors: no table
	c.RankTable(8, map[string]int{"m.q": 8, "m.v": 3}, map[string]float64{"m.v": 0.125})
	out := c.String()
	assert.Contains(t, out, "largest relative error ||D - B'A'|| / ||D|| of a module: 0.125")
	assert.Contains(t, out, "| `m.q` | 8 | - |\n| `m.v` | 3 | 0.125 |\n")
}

func TestQuoting(t *testing.T) {
	assert.Equal(t, "meta-llama/Llama-2-7b", YAMLString("meta-llama/Llama-2-7b"))
	assert.Equal(t, `"a: b"`, YAMLString("a: b"))
	assert.Equal(t, `""`, YAMLString(""))
	assert.Equal(t, "`a\\|b`", Code("a|b"))
	assert.Equal(t, "`` a`b ``", Code("a`b"))
}

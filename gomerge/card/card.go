package card

import (
	"fmt"
	"sort"
	"strings"
)

// Version is gomerge's version, shared by the engine and the Python
// package, and named in every card.
const Version = "0.1.0"

// Link is the Markdown link to gomerge that the cards' introductions use.
const Link = "[gomerge](https://pypi.org/project/gomerge/)"

// Card is a model card: the YAML front matter, a "# Title", an
// introduction and the sections in the order they were added.
type Card struct {
	BaseModel string   // base_model in the metadata, left out when empty
	Library   string   // library_name: "peft" or "transformers"
	Tags      []string // the metadata's tags
	Title     string   // the "# Title" line
	Intro     string   // the paragraph below the title
	sections  []*Section
}

// Section is one part of a card: a "## Heading" (none when empty, for a
// note between sections) and its body, one line at a time.
type Section struct {
	Heading string
	body    strings.Builder
}

// Section appends a section with the given heading and returns it.
func (c *Card) Section(heading string) *Section {
	s := &Section{Heading: heading}
	c.sections = append(c.sections, s)
	return s
}

// Printf appends formatted text to the section's body.
func (s *Section) Printf(format string, args ...any) { fmt.Fprintf(&s.body, format, args...) }

// Text appends text to the section's body as it is.
func (s *Section) Text(text string) { s.body.WriteString(text) }

// Lines appends each line followed by a newline, e.g. a command's
// parameters as methods.Combine.CardLines gives them.
func (s *Section) Lines(lines []string) {
	for _, l := range lines {
		s.body.WriteString(l + "\n")
	}
}

// List appends a bullet list of inline-code items.
func (s *Section) List(items []string) {
	for _, it := range items {
		fmt.Fprintf(&s.body, "- `%s`\n", it)
	}
}

// Table appends a Markdown table header with the given columns.
func (s *Section) Table(columns ...string) {
	s.Row(columns...)
	s.body.WriteString("|" + strings.Repeat("---|", len(columns)) + "\n")
}

// Row appends one table row of the given cells.
func (s *Section) Row(cells ...string) {
	s.body.WriteString("| " + strings.Join(cells, " | ") + " |\n")
}

// String renders the card.
func (c *Card) String() string {
	var b strings.Builder
	b.WriteString("---\n")
	if c.BaseModel != "" {
		fmt.Fprintf(&b, "base_model: %s\n", YAMLString(c.BaseModel))
	}
	fmt.Fprintf(&b, "library_name: %s\ntags:\n", c.Library)
	for _, t := range c.Tags {
		fmt.Fprintf(&b, "- %s\n", t)
	}
	fmt.Fprintf(&b, "---\n\n# %s\n\n%s\n\n", c.Title, c.Intro)
	for i, s := range c.sections {
		if i > 0 {
			b.WriteString("\n")
		}
		if s.Heading != "" {
			fmt.Fprintf(&b, "## %s\n\n", s.Heading)
		}
		b.WriteString(s.body.String())
	}
	return b.String()
}

// RankTable adds the "Ranks" section: each module's rank and the relative
// error of its factorisation, when the ranks differ between modules or
// errors were measured; otherwise nothing.
func (c *Card) RankTable(rank int, moduleRanks map[string]int, moduleErrors map[string]float64) {
	if len(moduleErrors) == 0 && !mixedRanks(moduleRanks) {
		return
	}
	names := make([]string, 0, len(moduleRanks))
	for name := range moduleRanks {
		names = append(names, name)
	}
	sort.Strings(names)
	worst := 0.0
	for _, e := range moduleErrors {
		worst = max(worst, e)
	}
	s := c.Section("Ranks")
	s.Printf("r = %d; largest relative error ||D - B'A'|| / ||D|| of a module: %.3g.\n\n", rank, worst)
	s.Table("module", "rank", "relative error")
	for _, name := range names {
		e := "-"
		if v, ok := moduleErrors[name]; ok {
			e = fmt.Sprintf("%.3g", v)
		}
		s.Row("`"+name+"`", fmt.Sprint(moduleRanks[name]), e)
	}
}

func mixedRanks(ranks map[string]int) bool {
	first := -1
	for _, r := range ranks {
		if first >= 0 && r != first {
			return true
		}
		first = r
	}
	return false
}

// PeftUsage adds the "Usage" section of an adapter: loading base, then the
// adapter in dir, with PEFT.
func (c *Card) PeftUsage(base, dir string) {
	c.Section("Usage").Printf("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"+
		"base = AutoModelForCausalLM.from_pretrained(%q)\nmodel = PeftModel.from_pretrained(base, %q)\n```\n", base, dir)
}

// Code shows s as inline code inside a Markdown table cell: a fence longer
// than any run of backticks in s, and pipes escaped (GitHub's tables split
// cells at them, code spans included).
func Code(s string) string {
	run, longest := 0, 0
	for _, c := range s {
		if c == '`' {
			run++
			longest = max(longest, run)
		} else {
			run = 0
		}
	}
	fence := strings.Repeat("`", longest+1)
	if longest > 0 {
		s = " " + s + " "
	}
	return fence + strings.ReplaceAll(s, "|", `\|`) + fence
}

// YAMLString quotes s for YAML when it is not a plain scalar.
func YAMLString(s string) string {
	if s == "" || strings.ContainsAny(s, ":#{}[],&*?|<>=!%@`'\"\n") || strings.TrimSpace(s) != s {
		return fmt.Sprintf("%q", s)
	}
	return s
}

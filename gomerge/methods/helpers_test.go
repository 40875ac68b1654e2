package methods

import "context"

// mergekitOf is the mergekit merge of a method row, for the tests of its steps.
func mergekitOf(name string) mergekitMethod {
	switch name {
	case "della":
		return mkDella
	case "della_linear":
		return mkDellaLinear
	}
	return mkBreadcrumbs
}

// mergeSpan runs a span method's row on one module, with the seed given.
func mergeSpan(srcs []Source, o *Combine, rank int, in, out int, seed uint64, module string) (a, b []float32, k int, relErr float64, err error) {
	c := *o
	c.Seed = &seed
	res, err := c.method.Merge(context.Background(), &ModuleJob{Name: module, Srcs: srcs, In: in, Out: out}, &c, rank)
	return res.a, res.b, res.rank, res.relErr, err
}

// comb is the element-wise step of one of PEFT's combination types.
func comb(name string, density float64) Combination {
	m, err := LookupMethod(name)
	if err != nil {
		panic(err)
	}
	return Combination{Pruning: m.Pruning, TIES: m.TIES, Density: density, SignMethod: "total"}
}

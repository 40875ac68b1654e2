package kernels

import (
	"encoding/json"
	"gomerge/gomerge/errs"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// kernelsReportEnv makes TestEnvRequests's child report what the
// engine chose at start-up.
const kernelsReportEnv = "GOMERGE_KERNELSET_REPORT"

// kernelsReport is what the engine chose, as the child process reports it.
type kernelsReport struct {
	Set      string   `json:"set"`
	Runnable []string `json:"runnable"`
	Kind     string   `json:"kind"`
	Error    string   `json:"error"`
}

// The kernel set is chosen once, at start-up, from GOMERGE_KERNELS and the
// CPU: each request runs this test binary again with that environment, and
// the engine must run what was asked (the fastest runnable set for auto),
// or refuse a set it cannot honour with a ValueError naming the request
// while the portable kernels stand in.
func TestEnvRequests(t *testing.T) {
	if os.Getenv(kernelsReportEnv) == "1" {
		rep := kernelsReport{Set: InUse(), Runnable: Runnable()}
		if err := Err(); err != nil {
			rep.Kind, rep.Error = string(errs.KindOf(err)), err.Error()
		}
		require.NoError(t, json.NewEncoder(os.Stdout).Encode(rep))
		return
	}
	report := func(t *testing.T, request string) kernelsReport {
		// under an emulator (tests/platforms/cpus.sh), the child runs under the same one
		args := append(strings.Fields(os.Getenv("GOMERGE_TEST_EXEC")), os.Args[0], "-test.run=^TestEnvRequests$", "-test.count=1")
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), kernelsReportEnv+"=1", Env+"="+request)
		out, err := cmd.Output()
		require.NoError(t, err, "%s=%q: %s", Env, request, out)
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "{") {
				var rep kernelsReport
				require.NoError(t, json.Unmarshal([]byte(line), &rep))
				return rep
			}
		}
		t.Fatalf("%s=%q: no report in %q", Env, request, out)
		return kernelsReport{}
	}
	requests := append([]string{"", "auto", "neon"}, Runnable()...)
	for _, request := range requests {
		t.Run("request "+request, func(t *testing.T) {
			rep := report(t, request)
			require.NotEmpty(t, rep.Runnable)
			assert.Equal(t, "go", rep.Runnable[0], "the portable kernels run everywhere")
			switch request {
			case "", "auto":
				assert.Equal(t, rep.Runnable[len(rep.Runnable)-1], rep.Set, "the fastest runnable set")
				assert.Empty(t, rep.Error)
			case "neon":
				assert.Equal(t, "go", rep.Set, "the portable kernels while the request is refused")
				assert.Equal(t, string(errs.KindValue), rep.Kind)
				assert.Contains(t, rep.Error, Env+`="neon" is not a kernel set`)
			default:
				assert.Equal(t, request, rep.Set)
				assert.Empty(t, rep.Error)
			}
		})
	}
}

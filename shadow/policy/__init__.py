"""The policy brain: verdicts -> decisions over an explicit state machine, and which replays to run.

Pure (no torch, Ray, MLflow or I/O): `decide` takes the policy, the state and a new verdict and
returns `Decisions(state, decisions)` (the state carries all it remembers, so a call costs the same at
any run length); `due_replays` says which replays to start on the
cadence, `watch` which training signals call for an extra replay now (the policy's `triggers`). The
controller executes decisions (at step boundaries) and logs each one with its reason.

A window's metric is `compare.metric`, oriented so that positive = FP8 worse; with
`thresholds.two_sided` (the default) a gap in FP8's favour is judged by its size, so below "metric"
means |metric|. "clean" = metric at or below `warn`, "warn" = above `warn` and at or below `switch`, "violation" = above `switch` or the FP8
side went non-finite while BF16 did not. Thresholds are the configured ones, raised by the noise
floor once calibration (if enabled) is done; until then violations are reported as WARN and not
counted (a non-finite FP8 loss always counts). Windows count in step order; a window older than one
already judged in the regime, or starting before the regime (`since_step`), is only noted.

| state | input | condition | decisions | next state |
| --- | --- | --- | --- | --- |
| FP8 | verify window | clean | NOTE (streak reset; window start becomes the rollback target) | FP8 |
| FP8 | verify window | warn | WARN (streak reset) | FP8 |
| FP8 | verify window | violation, streak < `consecutive` | WARN "violation k of n" | FP8 |
| FP8 | verify window | violation, streak = `consecutive` (non-finite FP8: at once) | SWITCH_TO_BF16(`on_switch`) | BF16_FALLBACK |
| FP8, FP8_PROBATION | verify window | as above, and the fallback reaches `max_switches` | SWITCH_TO_BF16, STAY_BF16 | BF16_FOREVER |
| FP8 / FP8_PROBATION | verify window | metric grew over the last `trend_windows` windows | extra WARN | unchanged |
| FP8 / FP8_PROBATION | verify window | warn or violation, accumulated evidence beyond `evidence_limit` | SWITCH_TO_BF16(`on_switch`) | BF16_FALLBACK |
| BF16_FALLBACK | probe window | clean, clean probes < `clean_probes` | NOTE "clean probe k of n" | BF16_FALLBACK |
| BF16_FALLBACK | probe window | clean probes = `clean_probes` | SWITCH_TO_FP8 | FP8_PROBATION (FP8 if `probation_windows` = 0) |
| BF16_FALLBACK | probe window | warn or violation | NOTE (clean probes reset) | BF16_FALLBACK |
| BF16_FALLBACK | any window | fallbacks >= `max_switches` (policy edited) | STAY_BF16 | BF16_FOREVER |
| FP8_PROBATION | verify window | clean, clean windows = `probation_windows` | NOTE "FP8 trusted again" | FP8 |
| FP8_PROBATION | verify window | clean, fewer | NOTE | FP8_PROBATION |
| FP8_PROBATION | verify window | warn | WARN | FP8_PROBATION |
| FP8_PROBATION | verify window | violation (one is enough) | SWITCH_TO_BF16(`on_switch`) | BF16_FALLBACK |
| BF16_FOREVER | any window | - | NOTE (ignored) | BF16_FOREVER |
| any | noise window | calibrating | NOTE (the last one sets the noise floor and the scaled thresholds) | unchanged |
| any | stale, mismatched or unjudgeable window | - | NOTE with the reason | unchanged |
| any, `action.mode: observe` | a row above with SWITCH_* / STAY_BF16 | - | REPORT "would ..." instead | unchanged (counters still count) |

Beside the table: `cadence` holds the adaptive verification interval (a counter in the state that
clean windows raise and anything else resets), `evidence` the CUSUM over windows behind the
evidence row, `early_stop` whether a running window's steps already decide it, and `pays` the
once-per-run judgement of the measured FP8 speedup (`action.fp8_must_pay`: WARN, or STAY_BF16).

`on_switch` sets where BF16 training resumes (`payload["resume_step"]`): `bf16` at the current main
step; `rollback` at the start of the last clean verification window of the regime, or, without one,
at the start of the first window of the violating streak; `adopt_replay` at the end of the violating
window, from the replay's BF16 end state.
"""

from shadow.policy import cadence
from shadow.policy.decide import decide, purpose_of
from shadow.policy.noise import calibrate, effective_thresholds, scale_thresholds
from shadow.policy.pays import judge_speed
from shadow.policy.schedule import due_replays
from shadow.policy.state import (Decision, DecisionKind, Decisions, Machine, PolicyState, Purpose,
                                 ReplayRequest)
from shadow.policy.triggers import Firing, TriggerState, watch

__all__ = ["Decision", "DecisionKind", "Decisions", "Firing", "Machine", "PolicyState", "Purpose", "ReplayRequest",
           "TriggerState", "cadence", "calibrate", "decide", "due_replays", "effective_thresholds", "judge_speed",
           "purpose_of", "scale_thresholds", "watch"]

"""Did an open loop keep its schedule? The one rule, for the harness (a point as it is measured) and the analysis
(the rows of any run, older ones included); pure, so the analysis and the notebooks import no server.

An open loop sends request *k* at its scheduled time, and latency is measured from that time, so a
generator that falls behind adds its own delays to every latency after. When more than ``BEHIND_MAX``
of the requests scheduled inside the window were sent over 1 ms late or never sent, the point cannot
stand for the server. Which late sends count: the compiled engine tells apart the sends that waited
for their connection's reply (``held``: the pipeline was full, the server was behind, which the
latency from the schedule rightly shows) and is judged on the others (``own_late``); the Python
engine cannot tell the two apart and is judged on every late send.
"""
from __future__ import annotations

BEHIND = "load generator behind its schedule"   # an invalid point's reason
BEHIND_MAX = 0.01           # of the offered requests, sent over 1 ms late or never sent: the open loop fell behind


def behind_schedule(offered, late, unsent, own_late=None) -> str | None:
    """"load generator behind its schedule (...)" when the open loop fell behind (the module's rule), judged on
    ``own_late`` where the engine gives it, else on ``late``; None when it kept up or the numbers are missing."""
    numbers = [offered, late, unsent]
    if any(not isinstance(n, (int, float)) or n != n for n in numbers) or offered <= 0:
        return None
    own = isinstance(own_late, (int, float)) and own_late == own_late
    behind = (own_late if own else late) + unsent
    if behind <= BEHIND_MAX * offered:
        return None
    whose = "its own" if own else "its own or waiting for replies: this engine cannot tell"
    return (f"{BEHIND} ({100 * behind / offered:.2g} % of the requests over 1 ms late or never sent, {whose})")

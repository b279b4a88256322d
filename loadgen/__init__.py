"""The load generator (closed loop, open loop, hold) — see docs/ once it lands."""

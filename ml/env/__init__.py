"""The trading environment: what an action means (action spaces), fills, costs and NAV accounting."""

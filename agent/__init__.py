"""The vitals gateway agent."""

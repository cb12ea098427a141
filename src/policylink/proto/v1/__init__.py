"""policylink.v1 messages and the PolicyService stub (generated; do not edit)."""

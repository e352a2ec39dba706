"""Over-the-air bundle updates: fetch (resumable), verify, A/B slots, health check, rollback."""

// Placeholder: filled in by the engineer who owns this file this session.

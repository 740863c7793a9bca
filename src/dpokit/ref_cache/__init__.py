"""Reference log-probs computed once and kept on disk: fingerprint (what they depend on), store (files), build."""

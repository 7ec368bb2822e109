"""`dlsuite diagnose`: initialization study, overfit check, LR range test, curve doctor, memory probe."""

"""The lab: the real parts smtpgate is tested, benchmarked and demonstrated with (README.md)."""

"""smtpgate: a transparent encryption gateway for port-25 SMTP."""

__version__ = "0.1.0"

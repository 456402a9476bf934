"""The SMTP edge: accept mail for the support domains, make it durable, answer 250 or 4xx."""

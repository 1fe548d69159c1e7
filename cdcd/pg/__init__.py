"""What every cdcd connection to Postgres shares: session settings and catalog queries."""

"""The database: connection, embedded server and one repository per collection."""

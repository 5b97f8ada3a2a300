"""The one result record schema and what builds, writes and reads it: the record and its
setting (``schema``), records from a protocol's output (``build``), the results store's
unit files (``store``) and the pandas frame over a results folder (``frame``). Imports
protocols (their cards and outputs), never what reads records."""

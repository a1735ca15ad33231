"""Data: dataset rows -> chat messages -> tokenized examples (formatters, sources, Spider schemas, the text-to-
SQL instruction and scoring). Imports nothing else of qlora."""

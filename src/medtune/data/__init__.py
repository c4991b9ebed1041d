"""Data converters: read public data sets in the shapes found in the wild into validated records.

``medtune.data.cmexam`` reads CMExam (CSV, JSON lines, xlsx) into ``ExamRecord`` objects.
"""

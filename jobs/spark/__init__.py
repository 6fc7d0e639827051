"""The SparkSession builder, and what spark-submit ships to a cluster."""

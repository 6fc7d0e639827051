"""Small taxonomies the pipeline, taxonomy-job and notebook tests run on."""

TWO_DISCIPLINES = """
fields:
  - name: Academic-Formal Science
    sub_fields:
      - name: Mathematics and logic
        disciplines:
          - name: Mathematics
          - name: Logic
"""

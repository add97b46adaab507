"""One module per chapter, each registering that chapter's exercises with arcourse.course.grading."""
